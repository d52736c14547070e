"""Parti (Yu et al. 2022): text-to-image as sequence-to-sequence over image codes.

A transformers ``T5EncoderModel`` reads the prompt; a transformers ``GPT2LMHeadModel`` with
cross-attention writes the image's codes (from an image tokenizer, ``anygen.tokenizers.vq``)
one at a time, attending to the text. Both are transformers classes, so the KV cache
(``EncoderDecoderCache``: self-attention grows, cross-attention is computed once) and the
attention backends (``attn_implementation``) come with them, and a user can start from a
pretrained T5 encoder.

Decoder vocabulary: the K image codes, then one begin-image token (id K) that starts every
sequence. Training is teacher-forced cross-entropy on the codes; 10% empty captions teach
the null-text condition that classifier-free guidance subtracts.

    logits = model(text_ids, text_mask, codes)                    # (B, N, K)
    codes = generate_codes(model, text_ids, text_mask, null_ids, null_mask, guidance_scale=3)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from anygen.errors import CheckpointError, UserInputError, load_errors
from anygen.hub import CONFIG_NAME, load_config
from anygen.sampling import guide, process_logits, sample_tokens

log = logging.getLogger(__name__)


@dataclass
class PartiConfig:
    text_vocab_size: int = 309  # the shapes-bpe tokenizer
    text_pad_id: int = 0
    text_eos_id: int = 2
    max_text_len: int = 32  # prompt tokens, the end-of-text token included
    image_vocab_size: int = 512  # the image tokenizer's codebook size
    image_tokens: int = 64  # codes per image, e.g. 8 x 8
    d_model: int = 256
    encoder_layers: int = 2
    decoder_layers: int = 6
    num_heads: int = 4
    ffn_ratio: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads:
            raise UserInputError(
                f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}"
            )

    @property
    def bos_id(self) -> int:
        return self.image_vocab_size


PARTI_PRESETS: dict[str, PartiConfig] = {
    "tiny": PartiConfig(
        image_vocab_size=32,
        image_tokens=16,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        num_heads=2,
        ffn_ratio=2,
    ),
    # sized to train on a 2-core CPU in under an hour (1.7 M parameters)
    "shapes": PartiConfig(d_model=128, encoder_layers=2, decoder_layers=4, num_heads=4),
    # the bundled shapes-parti: wider and deeper, 4.9 M parameters, 6,000 steps in 85 min
    # at 1 thread (0.497 on 300 validation t2i prompts against 0.427 for "shapes" after
    # 10,000 steps), then 6,000 more from those weights in 71 min at 2 threads, then
    # 12,000 more on weighted caption forms in 97 min at 2 threads (recipe --caption-forms),
    # then 11,000 more on the same forms in 95 min, then 9,000 at lr 3e-4 in 77 min
    "shapes-m": PartiConfig(d_model=192, encoder_layers=2, decoder_layers=6, num_heads=6),
    # Parti's shape at a size for one GPU: 8-layer decoder, 4-layer encoder, width 512
    "base": PartiConfig(d_model=512, encoder_layers=4, decoder_layers=8, num_heads=8),
    # Parti-750M's shape (Yu et al. 2022, table 1: 12-layer encoder, 36-layer decoder,
    # width 1024, 16 heads) over a ViT-VQGAN's 8192 codes, 32 x 32 an image; about 0.8 B
    # parameters, for GPU benchmarks with random weights
    "750m": PartiConfig(
        image_vocab_size=8192,
        image_tokens=1024,
        d_model=1024,
        encoder_layers=12,
        decoder_layers=36,
        num_heads=16,
    ),
}


def build_text_encoder(c: PartiConfig) -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=c.text_vocab_size,
            d_model=c.d_model,
            d_kv=c.d_model // c.num_heads,
            d_ff=c.d_model * c.ffn_ratio,
            num_layers=c.encoder_layers,
            num_heads=c.num_heads,
            dropout_rate=c.dropout,
            feed_forward_proj="gated-gelu",
            pad_token_id=c.text_pad_id,
            eos_token_id=c.text_eos_id,
            is_encoder_decoder=False,
            use_cache=False,
        )
    )


def build_decoder(c: PartiConfig) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=c.image_vocab_size + 1,  # codes + begin-image
            n_positions=c.image_tokens,
            n_embd=c.d_model,
            n_layer=c.decoder_layers,
            n_head=c.num_heads,
            n_inner=c.d_model * c.ffn_ratio,
            resid_pdrop=c.dropout,
            embd_pdrop=c.dropout,
            attn_pdrop=c.dropout,
            add_cross_attention=True,
            bos_token_id=c.bos_id,
            eos_token_id=None,
            pad_token_id=None,
            tie_word_embeddings=True,
        )
    )


class PartiTransformer(nn.Module):
    """Text encoder + autoregressive image-code decoder with cross-attention."""

    def __init__(
        self,
        config: PartiConfig,
        text_encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.text_encoder = text_encoder if text_encoder is not None else build_text_encoder(config)
        self.decoder = decoder if decoder is not None else build_decoder(config)

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> text states (B, L, D)."""
        return self.text_encoder(input_ids=text_ids, attention_mask=text_mask).last_hidden_state

    def decoder_inputs(self, codes: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: (B, N) codes -> (B, N) inputs [begin-image, c_0 .. c_{N-2}]."""
        bos = torch.full_like(codes[:, :1], self.config.bos_id)
        return torch.cat([bos, codes[:, :-1]], dim=1)

    def forward(
        self, text_ids: torch.Tensor, text_mask: torch.Tensor, codes: torch.Tensor
    ) -> torch.Tensor:
        """Next-code logits (B, N, K) for every position of (B, N) codes."""
        states = self.encode_text(text_ids, text_mask)
        out = self.decoder(
            input_ids=self.decoder_inputs(codes),
            encoder_hidden_states=states,
            encoder_attention_mask=text_mask,
            use_cache=False,
        )
        return out.logits[..., : self.config.image_vocab_size]

    # ------------------------------------------------------------------ save / load

    def save_pretrained(
        self, directory: str | os.PathLike, dtype: torch.dtype | None = None
    ) -> None:
        """``config.json`` (anygen's) and the two transformers models in their own format,
        under ``text_encoder/`` and ``decoder/``. Not atomic by itself: the pipeline's
        ``save_pretrained`` writes into a temporary directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": type(self).__name__, **dataclasses.asdict(self.config)}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        for name in ("text_encoder", "decoder"):
            module = getattr(self, name)
            if dtype is not None:
                module = _copy_to(module, dtype)
            module.save_pretrained(directory / name)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, *, dtype: torch.dtype | None = None
    ) -> PartiTransformer:
        from transformers import GPT2LMHeadModel, T5EncoderModel

        directory = Path(directory)
        config = load_config(directory, PartiConfig, class_name=cls.__name__)
        parts = {}
        for name, klass in (("text_encoder", T5EncoderModel), ("decoder", GPT2LMHeadModel)):
            folder = directory / name
            if not (folder / CONFIG_NAME).is_file():
                raise CheckpointError(f"{directory} has no {name}/{CONFIG_NAME}")
            try:
                parts[name] = klass.from_pretrained(
                    folder, dtype=dtype or torch.float32, use_safetensors=True
                )
            except load_errors() as e:
                raise CheckpointError(f"cannot load {folder}: {str(e).splitlines()[0]}") from e
        model = cls(config, **parts)
        _check_sizes(model)
        return model.eval()


def _copy_to(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    import copy

    return copy.deepcopy(module).to(dtype=dtype)


def _check_sizes(model: PartiTransformer) -> None:
    c = model.config
    enc, dec = model.text_encoder.config, model.decoder.config
    problems = []
    if enc.d_model != dec.n_embd:
        problems.append(f"text encoder width {enc.d_model} != decoder width {dec.n_embd}")
    if dec.vocab_size != c.image_vocab_size + 1:
        problems.append(f"decoder vocabulary {dec.vocab_size} != {c.image_vocab_size} codes + 1")
    if dec.n_positions < c.image_tokens:
        problems.append(f"decoder has {dec.n_positions} positions for {c.image_tokens} codes")
    if enc.vocab_size < c.text_vocab_size:
        problems.append(f"text encoder vocabulary {enc.vocab_size} < {c.text_vocab_size}")
    if problems:
        raise CheckpointError("inconsistent Parti checkpoint: " + "; ".join(problems))


# -----------------------------------------------------------------------------
# text, loss


def tokenize_prompts(
    tokenizer, texts: Sequence[str], config: PartiConfig, *, truncate: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (B, L) ids ending in end-of-text, right-padded, and their mask.

    A prompt longer than ``max_text_len`` is an error (``truncate`` cuts it instead, for
    training data)."""
    rows = []
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        if len(ids) + 1 > config.max_text_len:
            if not truncate:
                raise UserInputError(
                    f"the prompt is {len(ids)} tokens; this model reads at most "
                    f"{config.max_text_len - 1}: {text[:60]!r}"
                )
            ids = ids[: config.max_text_len - 1]
        rows.append(ids + [config.text_eos_id])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), config.text_pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def parti_loss(
    model: PartiTransformer, text_ids: torch.Tensor, text_mask: torch.Tensor, codes: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Cross-entropy of the next code, averaged over every code of every image."""
    codes = codes.reshape(codes.shape[0], -1)  # (B, N)
    logits = model(text_ids, text_mask, codes)  # (B, N, K)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten())
    with torch.no_grad():
        acc = (logits.argmax(-1) == codes).float().mean()
    return {"loss": loss, "accuracy": acc}


# -----------------------------------------------------------------------------
# decoding: prefill once, then one code per step with the KV cache


def decode_step(
    model: PartiTransformer,
    tokens: torch.Tensor,
    states: torch.Tensor,
    text_mask: torch.Tensor,
    cache=None,
    *,
    use_cache: bool = True,
):
    """Logits (B, K) of the next code and the updated cache.

    With ``use_cache`` the first call (the prefill) takes every token so far and later calls
    only the newest one; without, every call recomputes the whole prefix (the reference).
    """
    inputs = tokens[:, -1:] if (use_cache and cache is not None) else tokens
    out = model.decoder(
        input_ids=inputs,
        encoder_hidden_states=states,
        encoder_attention_mask=text_mask,
        past_key_values=cache if use_cache else None,
        use_cache=use_cache,
    )
    logits = out.logits[:, -1, : model.config.image_vocab_size]  # (B, K)
    return logits, (out.past_key_values if use_cache else None)


def _pad_to(ids: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return F.pad(ids, (0, width - ids.shape[1]), value=value)


@torch.no_grad()
def generate_codes(
    model: PartiTransformer,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    null_ids: torch.Tensor | None = None,
    null_mask: torch.Tensor | None = None,
    *,
    guidance_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generators: Sequence[torch.Generator] | torch.Generator | None = None,
    use_cache: bool = True,
    batched_guidance: bool = True,
    callback: Callable[[int, int, dict], None] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Sample exactly ``image_tokens`` codes per prompt: (B, L) text -> (B, N) codes.

    Guidance > 1 needs the null (unconditional or negative-prompt) text; its rows run in
    the same batch as the conditional ones (``batched_guidance=False``: two separate
    passes with two caches, the reference for the benchmark). Every row draws from its
    own generator.
    """
    c = model.config
    b = text_ids.shape[0]
    do_cfg = guidance_scale != 1.0
    device = text_ids.device
    if do_cfg and (null_ids is None or null_mask is None):
        raise ValueError("guidance needs null_ids and null_mask (the empty prompt's tokens)")
    if do_cfg and batched_guidance:
        width = max(text_ids.shape[1], null_ids.shape[1])
        ids = torch.cat(
            [_pad_to(text_ids, width, c.text_pad_id), _pad_to(null_ids, width, c.text_pad_id)]
        )
        masks = torch.cat([_pad_to(text_mask, width, 0), _pad_to(null_mask, width, 0)])
        streams = [(ids, masks)]  # (2B, L): conditional rows first
    elif do_cfg:
        streams = [(text_ids, text_mask), (null_ids, null_mask)]
    else:
        streams = [(text_ids, text_mask)]
    states = [model.encode_text(i, m) for i, m in streams]
    tokens = [
        torch.full((i.shape[0], 1), c.bos_id, dtype=torch.long, device=device) for i, _ in streams
    ]
    caches = [None] * len(streams)
    codes = torch.empty((b, c.image_tokens), dtype=torch.long, device=device)
    for step in tqdm(
        range(c.image_tokens), desc="parti decoding", disable=not progress, leave=False
    ):
        logits = []
        for s, (_, mask) in enumerate(streams):
            out, caches[s] = decode_step(
                model, tokens[s], states[s], mask, caches[s], use_cache=use_cache
            )
            logits.append(out)
        logits = torch.cat(logits).float()  # (B or 2B, K); guided in fp32, not fp16
        if do_cfg:
            logits = guide(logits[:b], logits[b:], guidance_scale)
        logits = process_logits(logits, temperature, top_k, top_p)
        nxt = sample_tokens(logits, generators, greedy=temperature == 0)  # (B,)
        codes[:, step] = nxt
        for s in range(len(streams)):
            reps = tokens[s].shape[0] // b
            tokens[s] = torch.cat([tokens[s], nxt.repeat(reps)[:, None]], dim=1)
        if callback is not None:
            callback(step + 1, c.image_tokens, {"codes": codes[:, : step + 1]})
    return codes
