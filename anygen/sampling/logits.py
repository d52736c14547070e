"""Logits processors and token draws, as plain functions over (B, V) logits.

    logits = guide(cond, uncond, scale)                      # classifier-free guidance
    logits = process_logits(logits, temperature, top_k, top_p)
    tokens = sample_tokens(logits, generators)               # (B,), one generator per row

Temperature 0 means greedy. Masked entries are ``-inf``. Each row draws from its own
``torch.Generator``, so row i of a batch equals the same prompt and seed run alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from anygen.errors import UserInputError


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: ``uncond + scale * (cond - uncond)`` (Parti,
    LlamaGen). ``scale`` 1 gives ``cond``; 0 gives ``uncond``."""
    return uncond + scale * (cond - uncond)


def process_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """(B, V) logits -> temperature-scaled logits with everything outside the top-k and the
    top-p nucleus set to ``-inf`` (the same sets as transformers' TopK/TopP warpers).
    ``top_k`` None or 0 and ``top_p`` None or 1 disable them; temperature 0 leaves the
    logits unscaled (``sample_tokens`` then takes the argmax)."""
    if temperature < 0:
        raise UserInputError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UserInputError(f"top-p must be in (0, 1], got {top_p}")
    logits = logits.float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    if top_k:
        k = min(int(top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= 1 - top_p  # the low tail whose mass is at most 1 - p
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor,
    generators: Sequence[torch.Generator] | torch.Generator | None = None,
    *,
    greedy: bool = False,
) -> torch.Tensor:
    """One token per row of (B, V) logits: argmax when ``greedy``, else a draw from
    softmax(logits) with row i's generator (a single generator serves every row in turn)."""
    if greedy:
        return logits.argmax(dim=-1)
    probs = logits.float().softmax(dim=-1)  # (B, V)

    def draw(p: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        # on the generator's device: make_generator gives MPS a CPU generator, and
        # multinomial wants both on one device
        if g is not None and g.device.type != p.device.type:
            return torch.multinomial(p.to(g.device), 1, generator=g).to(p.device)
        return torch.multinomial(p, 1, generator=g)

    if generators is None or isinstance(generators, torch.Generator):
        return draw(probs, generators).squeeze(1)
    if len(generators) != probs.shape[0]:
        raise ValueError(f"{len(generators)} generators for {probs.shape[0]} rows")
    return torch.cat([draw(p, g) for p, g in zip(probs, generators, strict=True)])
