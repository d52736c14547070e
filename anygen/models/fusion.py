"""Early fusion (Chameleon, Team 2024; Emu2, Sun et al. 2024): one decoder-only transformer
over a single sequence of text tokens and images, read and written in both directions.

The backbone is a transformers causal LM of the Llama family (``LlamaForCausalLM``, or
``Qwen3ForCausalLM`` when ``qk_norm`` is set: its per-head RMSNorm on queries and keys is
what Chameleon added for stability), so a user can start from a pretrained language model
and the KV cache and attention backends come with it. An image sits in the sequence as

    <boi> x_1 ... x_N <eoi>

with N = ``image_tokens``, in one of two representations, chosen per model:

- ``discrete`` (Chameleon): x_i are VQ codes appended to the vocabulary (ids
  ``text_vocab_size + code``); one softmax predicts text and image tokens alike, and the
  image tokenizer's decoder renders the codes.
- ``continuous`` (Emu2): x_i are a visual encoder's embeddings (``visual_dim`` wide),
  projected into the model by ``visual_in``; ``visual_out`` regresses the next embedding
  from the hidden state before it (the one at ``<boi>`` predicts x_1). Loss: cross-entropy
  on text + ``regression_weight`` * l2 on the embeddings. A diffusion decoder conditioned
  on the N embeddings renders them (``anygen.tokenizers.visual``). With ``visual_head``
  "diffusion" a diffusion head (MAR, Li et al. 2024; ``anygen.models.diffusion_head``)
  draws the residual the regression leaves, conditioned on the same hidden state, so that
  what a prompt leaves open is drawn rather than averaged; its noise-prediction loss is
  added to the model's.

Decoding (``decode``) is one interleaved loop over phases: text (sampled, image tokens
masked out), then on ``<boi>`` an image phase of exactly N codes (only image codes may be
sampled) or N regressed embeddings, then ``<eoi>`` and back to text. The KV cache is carried
across phases; classifier-free guidance runs the conditional rows and the unconditional
rows (``<bos> [negative prompt] <boi>`` + the image so far) in one batch. Every row draws
from its own ``torch.Generator`` and only while it is active, so a row of a batch equals the
same prompt and seed decoded alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anygen.errors import CheckpointError, UserInputError
from anygen.hub import load_config, load_state_dict, load_weights, save_pretrained
from anygen.models.diffusion_head import DiffusionHead
from anygen.sampling import guide, process_logits, sample_tokens

log = logging.getLogger(__name__)

IMAGE_MODES = ("discrete", "continuous")
VISUAL_HEADS = ("regression", "diffusion")
IGNORE = -100  # cross-entropy targets that do not count


@dataclass
class FusionConfig:
    image_mode: str = "discrete"  # "discrete" (Chameleon) | "continuous" (Emu2)
    # text vocabulary and its special ids (the shapes-bpe tokenizer's)
    text_vocab_size: int = 309
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    boi_id: int = 4
    eoi_id: int = 5
    img_id: int = 6  # placeholder of a continuous image position
    # images
    image_vocab_size: int = 512  # discrete: the image tokenizer's codebook size
    image_tokens: int = 64  # positions per image: codes (discrete) or embeddings (continuous)
    visual_dim: int = 0  # continuous: width of the visual encoder's embeddings
    regression_weight: float = 1.0  # continuous: weight of the l2 term
    # continuous: "regression" (Emu2: the regressed embedding is written) or "diffusion"
    # (the regression plus a residual drawn by a diffusion head, MAR-style)
    visual_head: str = "regression"
    diffusion_scale: float = 1.0  # residual * scale is what the head diffuses (unit-ish)
    diffusion_width: int = 0  # the head's MLP width (0: hidden_size)
    diffusion_depth: int = 3
    diffusion_steps: int = 50  # DDIM steps per embedding when sampling
    # backbone
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 704
    qk_norm: bool = False  # Qwen3 layers: RMSNorm on each head's queries and keys
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.image_mode not in IMAGE_MODES:
            raise UserInputError(
                f"image_mode must be one of {', '.join(IMAGE_MODES)}, got {self.image_mode!r}"
            )
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise UserInputError(
                f"hidden_size {self.hidden_size} must divide by num_heads {self.num_heads}, "
                f"which must divide by num_kv_heads {self.num_kv_heads}"
            )
        if self.continuous and self.visual_dim < 1:
            raise UserInputError("a continuous fusion model needs visual_dim >= 1")
        if self.image_tokens < 1:
            raise UserInputError(f"image_tokens must be >= 1, got {self.image_tokens}")
        if self.visual_head not in VISUAL_HEADS:
            raise UserInputError(
                f"visual_head must be one of {', '.join(VISUAL_HEADS)}, got {self.visual_head!r}"
            )
        if self.diffusion_head and not self.continuous:
            raise UserInputError(
                "a diffusion head draws continuous embeddings: image_mode must be continuous"
            )
        if self.diffusion_steps < 1 or self.diffusion_scale <= 0:
            raise UserInputError(
                f"diffusion_steps must be >= 1 and diffusion_scale > 0, got "
                f"{self.diffusion_steps} and {self.diffusion_scale}"
            )

    @property
    def continuous(self) -> bool:
        return self.image_mode == "continuous"

    @property
    def diffusion_head(self) -> bool:
        return self.visual_head == "diffusion"

    @property
    def vocab_size(self) -> int:
        """Text tokens, then (discrete) the image codes."""
        return self.text_vocab_size + (0 if self.continuous else self.image_vocab_size)

    @property
    def image_offset(self) -> int:
        """Token id of image code 0 (discrete)."""
        return self.text_vocab_size

    @property
    def image_span(self) -> int:
        """Sequence positions an image takes: <boi>, N codes or embeddings, <eoi>."""
        return self.image_tokens + 2


FUSION_PRESETS: dict[str, FusionConfig] = {
    "tiny": FusionConfig(
        image_vocab_size=32,
        image_tokens=16,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    ),
    "tiny-continuous": FusionConfig(
        image_mode="continuous",
        image_tokens=4,
        visual_dim=8,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    ),
    # the bundled models: sized to train on a 2-core CPU in about an hour (about 2.8 M
    # parameters, near compute-optimal for the ~3e14 FLOP such an hour gives)
    "shapes": FusionConfig(
        hidden_size=192, num_layers=6, num_heads=4, num_kv_heads=4, intermediate_size=512
    ),
    "shapes-continuous": FusionConfig(
        image_mode="continuous",
        image_tokens=16,
        visual_dim=64,
        hidden_size=192,
        num_layers=6,
        num_heads=4,
        num_kv_heads=4,
        intermediate_size=512,
    ),
    # Chameleon-7B's shape (Llama-2 7B with QK-norm), for GPU benchmarks with random weights
    "chameleon-7b": FusionConfig(
        text_vocab_size=57344,
        image_vocab_size=8192,
        image_tokens=1024,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        intermediate_size=11008,
        qk_norm=True,
        max_position_embeddings=4096,
    ),
    # about 1 B parameters: Llama-3.2-1B's shape over a Chameleon-sized vocabulary
    "1b": FusionConfig(
        text_vocab_size=57344,
        image_vocab_size=8192,
        image_tokens=1024,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=8192,
        qk_norm=True,
        max_position_embeddings=4096,
        rope_theta=500000.0,
    ),
}


# the 1b backbone with Emu2's visual interface: 64 regressed embeddings of EVA-CLIP's width
# (1792) per image, for the continuous path's GPU benchmarks
FUSION_PRESETS["1b-continuous"] = dataclasses.replace(
    FUSION_PRESETS["1b"], image_mode="continuous", image_tokens=64, visual_dim=1792
)


def build_backbone(c: FusionConfig, attn_implementation: str | None = None) -> nn.Module:
    """A fresh transformers causal LM for ``c``: Llama, or Qwen3 for QK-norm."""
    common = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_position_embeddings,
        pad_token_id=c.pad_id,
        bos_token_id=c.bos_id,
        eos_token_id=c.eos_id,
        tie_word_embeddings=c.tie_word_embeddings,
    )
    if c.qk_norm:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config = Qwen3Config(
            **common,
            head_dim=c.hidden_size // c.num_heads,
            rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        )
        model_class = Qwen3ForCausalLM
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            **common, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}
        )
        model_class = LlamaForCausalLM
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return model_class(config)


# -----------------------------------------------------------------------------
# the model


class FusionTransformer(nn.Module):
    """The backbone, and for continuous images the projection in and the regression head."""

    def __init__(self, config: FusionConfig, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.config = c = config
        self.backbone = backbone if backbone is not None else build_backbone(c)
        if c.continuous:
            self.visual_in = nn.Sequential(
                nn.Linear(c.visual_dim, c.hidden_size),
                nn.GELU(),
                nn.Linear(c.hidden_size, c.hidden_size),
            )
            self.visual_out = nn.Sequential(
                nn.Linear(c.hidden_size, c.hidden_size),
                nn.GELU(),
                nn.Linear(c.hidden_size, c.visual_dim),
            )
        if c.diffusion_head:
            self.diffusion = _diffusion_head(c)
        _check_backbone(self)

    def add_diffusion_head(self, scale: float) -> FusionTransformer:
        """Give a continuous model with a regression head a fresh diffusion head over the
        residual of its regression (times ``scale``); the rest of the model is kept."""
        c = self.config
        if not c.continuous or c.diffusion_head:
            raise UserInputError(
                "only a continuous model with a regression head can take a diffusion head; "
                f"this one is {c.image_mode} with a {c.visual_head} head"
            )
        self.config = dataclasses.replace(c, visual_head="diffusion", diffusion_scale=scale)
        self.diffusion = _diffusion_head(self.config).to(self.device, self.dtype)
        return self

    def deepened(self, num_layers: int) -> FusionTransformer:
        """A copy with ``num_layers`` decoder layers that computes exactly what this model
        computes. The new layers are spread evenly, each a copy of the layer before it with
        its attention output and MLP down projections zeroed, so that it adds nothing to the
        residual stream until training opens it (function-preserving growth, as in Net2Net
        and stacking)."""
        c = self.config
        if num_layers <= c.num_layers:
            raise UserInputError(
                f"a deepened model needs more than its {c.num_layers} layers, got {num_layers}"
            )
        extra = num_layers - c.num_layers
        after = sorted(int((k + 0.5) * c.num_layers / extra) for k in range(extra))
        order = []  # (old layer, whether the copy starts as an identity) for each new layer
        for i in range(c.num_layers):
            order.append((i, False))
            order.extend((i, True) for _ in range(after.count(i)))
        state = self.state_dict()
        prefix = "backbone.model.layers."
        grown_state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        for new, (old, identity) in enumerate(order):
            for key, value in state.items():
                if not key.startswith(f"{prefix}{old}."):
                    continue
                rest = key[len(f"{prefix}{old}.") :]
                silent = identity and rest.startswith(("self_attn.o_proj.", "mlp.down_proj."))
                grown_state[f"{prefix}{new}.{rest}"] = torch.zeros_like(value) if silent else value
        grown = FusionTransformer(dataclasses.replace(c, num_layers=num_layers))
        grown.load_state_dict(grown_state, strict=True)
        return grown.to(device=self.device, dtype=self.dtype)

    @property
    def device(self) -> torch.device:
        return self.backbone.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.get_input_embeddings().weight.dtype

    def embed(self, ids: torch.Tensor, visual: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings (B, T, D) of ids (B, T); continuous models put the projected
        ``visual`` embeddings (M, visual_dim), in order, at the ``img_id`` placeholders."""
        c = self.config
        x = self.backbone.get_input_embeddings()(ids)  # (B, T, D)
        if not c.continuous:
            if visual is not None:
                raise UserInputError("a discrete fusion model takes image codes, not embeddings")
            return x  # no placeholders to fill, so no count: torch.compile keeps one graph
        slots = ids == c.img_id
        if not torch.compiler.is_compiling():  # counting syncs with the host: eager only
            n_slots = int(slots.sum())
            n_visual = 0 if visual is None else visual.reshape(-1, c.visual_dim).shape[0]
            if n_slots != n_visual:
                raise UserInputError(
                    f"the sequence has {n_slots} image placeholder positions but "
                    f"{n_visual} visual embeddings were given"
                )
        if visual is not None:
            v = self.visual_in(visual.reshape(-1, c.visual_dim).to(x.dtype))  # (M, D)
            x = x.masked_scatter(slots[..., None], v)
        return x

    def hidden(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        use_cache: bool = False,
    ):
        """Last hidden states (B, T, D) and the cache."""
        out = self.backbone.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=use_cache,
        )
        return out.last_hidden_state, out.past_key_values

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.backbone.lm_head(hidden)  # (..., V)

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the image codes alone (..., K): inside an image span nothing else may
        be written, so the text rows of the head are never computed."""
        head = self.backbone.lm_head
        weight = head.weight[self.config.image_offset :]
        bias = None if head.bias is None else head.bias[self.config.image_offset :]
        return F.linear(hidden, weight, bias)

    def regress(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.visual_out(hidden)  # (..., visual_dim)

    def next_embeddings(
        self, hidden: torch.Tensor, noise: torch.Tensor | None, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """The next visual embedding (n, visual_dim) of each of n rows from the hidden states
        (n, D), or with guidance (2n, D) (conditional rows, then unconditional): the guided
        regression, plus with a diffusion head the residual it draws from ``noise``
        (n, visual_dim), divided by ``diffusion_scale``."""
        c = self.config
        n = hidden.shape[0] // 2 if guidance_scale != 1.0 else hidden.shape[0]
        pred = self.regress(hidden).float()
        value = guide(pred[:n], pred[n:], guidance_scale) if guidance_scale != 1.0 else pred
        if c.diffusion_head:
            residual = self.diffusion.sample(hidden, noise, c.diffusion_steps, guidance_scale)
            value = value + residual / c.diffusion_scale
        return value

    def forward(
        self,
        ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        visual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: hidden states (B, T, D) and next-token logits (B, T, V)."""
        h, _ = self.hidden(self.embed(ids, visual), attention_mask, _positions(attention_mask))
        return h, self.logits(h)

    # ------------------------------------------------------------------ save / load

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None):
        """``config.json`` and ``model.safetensors`` (backbone and visual heads together)."""
        config = {"_class_name": type(self).__name__, **dataclasses.asdict(self.config)}
        return save_pretrained(self, directory, config, dtype=dtype)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, *, dtype: torch.dtype | None = None
    ) -> FusionTransformer:
        directory = Path(directory)
        config = load_config(directory, FusionConfig, class_name=cls.__name__)
        model = cls(config)
        load_weights(model, load_state_dict(directory), source=directory)
        return model.to(dtype=dtype).eval()

    @classmethod
    def from_language_model(
        cls, language_model: nn.Module, config: FusionConfig
    ) -> FusionTransformer:
        """Start from a (pretrained) Llama-family causal LM: its vocabulary is grown to hold
        the image codes (new rows initialised as transformers does), the rest kept."""
        language_model.resize_token_embeddings(config.vocab_size)
        return cls(config, backbone=language_model)


def _diffusion_head(c: FusionConfig) -> DiffusionHead:
    width = c.diffusion_width or c.hidden_size
    return DiffusionHead(c.visual_dim, c.hidden_size, width, c.diffusion_depth)


def _check_backbone(model: FusionTransformer) -> None:
    c, bc = model.config, model.backbone.config
    problems = []
    if bc.vocab_size != c.vocab_size:
        problems.append(f"backbone vocabulary {bc.vocab_size} != {c.vocab_size} tokens")
    if bc.hidden_size != c.hidden_size:
        problems.append(f"backbone width {bc.hidden_size} != {c.hidden_size}")
    if problems:
        raise CheckpointError("inconsistent fusion model: " + "; ".join(problems))


def _positions(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Position ids that skip padding: (B, T) cumulative count of real tokens, from 0."""
    if mask is None:
        return None
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


# -----------------------------------------------------------------------------
# documents -> training rows, and the loss


@dataclass
class ImageSlot:
    """An image in a document: codes (N,) for discrete models, embeddings (N, visual_dim)
    for continuous ones. ``loss`` False: the model reads it but is not trained to write it."""

    data: torch.Tensor
    loss: bool = True


@dataclass
class TextSlot:
    ids: list[int]
    loss: bool = True


Document = Sequence[TextSlot | ImageSlot]


@dataclass
class Batch:
    """Teacher-forcing rows: ``ids`` (B, T), ``mask`` (B, T), ``targets`` (B, T) next-token
    ids or IGNORE, and for continuous models ``visual`` (M, N, visual_dim) in sequence order
    with ``regress`` (B, T) bool: positions whose hidden state predicts a visual embedding,
    and ``visual_targets`` (R, visual_dim) those embeddings, in order."""

    ids: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    visual: torch.Tensor | None = None
    regress: torch.Tensor | None = None
    visual_targets: torch.Tensor | None = None
    lengths: list[int] = field(default_factory=list)

    def to(self, device: torch.device | str) -> Batch:
        move = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **move)


def document_tokens(doc: Document, c: FusionConfig) -> tuple[list[int], list[bool], list]:
    """A document as ids (with <bos> ... <eos>), per-id "is a target" flags, and its images'
    embeddings (continuous). Image codes become ``image_offset + code``."""
    ids, train, visual = [c.bos_id], [False], []
    for slot in doc:
        if isinstance(slot, TextSlot):
            ids += list(slot.ids)
            train += [slot.loss] * len(slot.ids)
        else:
            if c.continuous:
                if tuple(slot.data.shape) != (c.image_tokens, c.visual_dim):
                    raise UserInputError(
                        f"an image is ({c.image_tokens}, {c.visual_dim}) embeddings for this "
                        f"model, got {tuple(slot.data.shape)}"
                    )
                body = [c.img_id] * c.image_tokens
                visual.append(slot.data)
            else:
                codes = slot.data.reshape(-1)
                if codes.numel() != c.image_tokens:
                    raise UserInputError(
                        f"an image is {c.image_tokens} codes for this model, got {codes.numel()}"
                    )
                body = (codes.long() + c.image_offset).tolist()
            ids += [c.boi_id, *body, c.eoi_id]
            train += [slot.loss] * (len(body) + 2)
    ids.append(c.eos_id)
    train.append(True)
    return ids, train, visual


def make_batch(docs: Sequence[Document], c: FusionConfig, max_len: int | None = None) -> Batch:
    """One right-padded teacher-forcing row per document (a document longer than
    ``max_len`` is an error: cutting one would cut an image span)."""
    return pack_rows([[d] for d in docs], c, max_len)


def pack_rows(
    rows_of_docs: Sequence[Sequence[Document]], c: FusionConfig, max_len: int | None = None
) -> Batch:
    """Rows of whole documents packed one after another (each <bos> ... <eos>), then
    right-padded, as language models pretrain: no row is mostly padding. A document sees
    the ones before it in its row (positions run on); no target crosses a document
    boundary (every <bos> is ignored as a target)."""
    rows = []
    for docs in rows_of_docs:
        ids, train, vis = [], [], []
        for d in docs:
            i, t, v = document_tokens(d, c)
            ids, train, vis = ids + i, train + t, vis + v
        rows.append((ids, train, vis))
    width = max(len(ids) for ids, _, _ in rows)
    if max_len is not None and width > max_len:
        raise UserInputError(f"a row is {width} tokens, longer than {max_len}")
    b = len(rows)
    ids = torch.full((b, width), c.pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    targets = torch.full((b, width), IGNORE, dtype=torch.long)
    regress = torch.zeros((b, width), dtype=torch.bool)
    visual, visual_targets = [], []
    for i, (row, train, vis) in enumerate(rows):
        n = len(row)
        ids[i, :n] = torch.tensor(row)
        mask[i, :n] = 1
        nxt = torch.tensor(row[1:])
        keep = torch.tensor(train[1:], dtype=torch.bool)
        # position t predicts token t + 1; placeholders are regressed, not classified
        targets[i, : n - 1] = torch.where(keep & (nxt != c.img_id), nxt, IGNORE)
        if c.continuous:
            flat = torch.cat(vis) if vis else torch.empty(0, c.visual_dim)
            k = 0  # which embedding of this row's images position t + 1 holds
            for t in range(n - 1):
                if row[t + 1] == c.img_id:
                    if train[t + 1]:
                        regress[i, t] = True
                        visual_targets.append(flat[k])
                    k += 1
            visual.extend(vis)
    batch = Batch(ids, mask, targets, lengths=[len(r[0]) for r in rows])
    if c.continuous:
        batch.visual = (
            torch.stack(visual) if visual else torch.empty(0, c.image_tokens, c.visual_dim)
        )
        batch.regress = regress
        batch.visual_targets = (
            torch.stack(visual_targets) if visual_targets else torch.empty(0, c.visual_dim)
        )
    return batch


def document_length(doc: Document, c: FusionConfig) -> int:
    """Tokens ``document_tokens`` makes of ``doc``."""
    n = 2  # <bos>, <eos>
    for slot in doc:
        n += len(slot.ids) if isinstance(slot, TextSlot) else c.image_span
    return n


def fusion_loss(model: FusionTransformer, batch: Batch) -> dict[str, torch.Tensor]:
    """Cross-entropy on every target token (text and, discrete, image codes) + for
    continuous models ``regression_weight`` * mean squared error of the regressed
    embeddings. Also reports text and image accuracy / regression error apart."""
    c = model.config
    h, logits = model(batch.ids, batch.mask, batch.visual)
    flat_t = batch.targets.flatten()
    ce = F.cross_entropy(logits.flatten(0, 1).float(), flat_t, ignore_index=IGNORE)
    out = {"ce": ce.detach()}
    loss = ce
    with torch.no_grad():
        pred = logits.argmax(-1).flatten()
        real = flat_t != IGNORE
        is_image = flat_t >= c.image_offset
        for name, sel in (("text_acc", real & ~is_image), ("image_acc", real & is_image)):
            if sel.any():
                out[name] = (pred[sel] == flat_t[sel]).float().mean()
    if c.continuous and batch.regress is not None and batch.regress.any():
        hidden = h[batch.regress]  # (R, D)
        predicted = model.regress(hidden)  # (R, visual_dim)
        mse = F.mse_loss(predicted.float(), batch.visual_targets.float())
        loss = loss + c.regression_weight * mse
        out["mse"] = mse.detach()
        if c.diffusion_head:  # the residual the regression leaves, scaled to unit-ish size
            residual = (batch.visual_targets.float() - predicted.detach().float()) * (
                c.diffusion_scale
            )
            diffusion = model.diffusion.loss(hidden, residual)
            loss = loss + diffusion
            out["diffusion"] = diffusion.detach()
    return {"loss": loss, **out}


@torch.no_grad()
def log_likelihood(
    model: FusionTransformer,
    prompts: Sequence[Prompt],
    scored: Sequence[int],
    batch_size: int = 64,
) -> torch.Tensor:
    """Log-probability (R,) of the last ``scored[r]`` ids of each row given the ids before
    them, under the distributions decoding samples from: an image code among the image
    codes alone (``image_logits``), any other id under the text phase's mask. Rows are
    scored in batches of ``batch_size``; a row's score does not depend on its batch."""
    c = model.config
    if len(scored) != len(prompts):
        raise ValueError(f"{len(scored)} scored lengths for {len(prompts)} rows")
    text_mask = _text_mask(c, "text", c.vocab_size, model.device)
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = prompts[start : start + batch_size]
        counts = scored[start : start + batch_size]
        width = max(len(p.ids) for p in rows)
        ids = torch.full((len(rows), width), c.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        where, targets = [], []  # (row, position) whose hidden state predicts the target
        for i, (p, k) in enumerate(zip(rows, counts, strict=True)):
            n = len(p.ids)
            if not 0 < k < n:
                raise ValueError(f"cannot score {k} of a row of {n} ids")
            ids[i, :n] = torch.tensor(p.ids)
            mask[i, :n] = 1
            for t in range(n - k, n):
                if p.ids[t] == c.img_id:
                    raise UserInputError("regressed visual embeddings have no likelihood")
                where.append((i, t - 1))
                targets.append(p.ids[t])
        visual = [p.visual for p in rows if p.visual is not None and len(p.visual)]
        visual = torch.cat(visual).to(model.device) if visual else None
        ids, mask = ids.to(model.device), mask.to(model.device)
        h, _ = model.hidden(model.embed(ids, visual), mask, _positions(mask))  # (B, T, D)
        r, t = torch.tensor(where, device=model.device).T
        h = h[r, t]  # (S, D)
        target = torch.tensor(targets, device=model.device)
        is_image = target >= c.image_offset
        logp = torch.empty(len(targets), device=model.device)
        if is_image.any():
            lp = model.image_logits(h[is_image]).float().log_softmax(-1)
            logp[is_image] = lp.gather(1, (target[is_image] - c.image_offset)[:, None])[:, 0]
        if (~is_image).any():
            lp = (model.logits(h[~is_image]).float() + text_mask).log_softmax(-1)
            logp[~is_image] = lp.gather(1, target[~is_image][:, None])[:, 0]
        out.append(torch.zeros(len(rows), device=model.device).index_add_(0, r, logp))
    return torch.cat(out).cpu()


# -----------------------------------------------------------------------------
# decoding: one interleaved loop over phases, KV cache carried across them


@dataclass
class Prompt:
    """A row to continue: ids (with <bos>, image codes offset) and, for continuous models,
    the embeddings (M, N, visual_dim) of the images at its placeholders."""

    ids: list[int]
    visual: torch.Tensor | None = None


@dataclass
class Plan:
    """What to write after the prompt, as a list of phases, each one of

    - ``"image"``: <boi> (unless the prompt or the last phase just wrote it), exactly
      N codes or embeddings, <eoi>;
    - ``"text"``: text until <eos> (an image may not start; <eos> is kept);
    - ``"text_to_image"``: text until the model starts an image (<eos> masked out);
    - ``"free"``: text, and whenever the model writes <boi> an image, until <eos> or
      ``max_images``/``max_new_tokens``.

    ``max_new_tokens`` bounds each text phase; a text phase that reaches it ends as if the
    model had written <eos> (``text``/``free``) or <boi> (``text_to_image``).
    """

    phases: list[str]
    max_new_tokens: int = 32
    max_images: int = 8

    def __post_init__(self) -> None:
        bad = [p for p in self.phases if p not in ("image", "text", "text_to_image", "free")]
        if bad:
            raise UserInputError(f"unknown decoding phases {bad}")
        if self.max_new_tokens < 1:
            raise UserInputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Sampling:
    temperature: float = 1.0  # text (0: greedy)
    top_k: int | None = None
    top_p: float | None = None
    image_temperature: float = 1.0  # discrete codes (0: greedy); a diffusion head's noise
    image_top_k: int | None = None
    image_top_p: float | None = None
    guidance_scale: float = 1.0  # classifier-free guidance of image spans (1: off)
    negative_ids: list[int] | None = None  # text of the unconditional rows (default: none)


@dataclass
class Written:
    """What one row wrote, in order: ("text", ids) and ("image", codes (N,) or
    embeddings (N, visual_dim)) pieces."""

    pieces: list[tuple[str, Any]] = field(default_factory=list)
    finished: bool = False  # wrote <eos>

    def add_text(self, token: int) -> None:
        if self.pieces and self.pieces[-1][0] == "text":
            self.pieces[-1][1].append(token)
        else:
            self.pieces.append(("text", [token]))


class _Rows:
    """Decoding state of R rows: the padding mask and positions of every input so far, the
    KV cache, and (for the no-cache reference only) every input embedding. Rows advance in
    lock step; a row that waits gets a masked pad at that step and keeps its position and
    its last hidden state."""

    def __init__(self, model: FusionTransformer, embeds, mask, use_cache: bool) -> None:
        self.model, self.use_cache = model, use_cache
        self.embeds = None if use_cache else embeds  # (R, L, D)
        self.mask = mask  # (R, L)
        self.positions = _positions(mask)  # (R, L)
        self.next_pos = mask.sum(-1)  # (R,)
        self.cache = None
        h, self.cache = model.hidden(embeds, mask, self.positions, use_cache=use_cache)
        self.hidden = h[:, -1]  # (R, D)

    def step(self, new: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Append one input (R, D) for each row (masked where not ``active``); returns the
        new last hidden states (R, D)."""
        active = active.long()
        pos = self.next_pos[:, None].clone()  # (R, 1)
        self.next_pos = self.next_pos + active
        self.mask = torch.cat([self.mask, active[:, None]], dim=1)
        self.positions = torch.cat([self.positions, pos], dim=1)
        if self.use_cache:
            h, self.cache = self.model.hidden(
                new[:, None], self.mask, pos, cache=self.cache, use_cache=True
            )
        else:  # the reference: the whole sequence, every step
            self.embeds = torch.cat([self.embeds, new[:, None]], dim=1)
            h, _ = self.model.hidden(self.embeds, self.mask, self.positions)
        # a waiting row's masked input is not in its sequence: it keeps its last real state
        self.hidden = torch.where(active.bool()[:, None], h[:, -1], self.hidden)
        return self.hidden

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices)."""
        for name in ("embeds", "mask", "positions", "next_pos", "hidden"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[rows])
        if self.cache is not None:
            self.cache.batch_select_indices(rows)

    def extend(self, other: _Rows) -> None:
        """Append ``other``'s rows, left-padding the shorter side's sequence to match."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        parts = [_left_pad(s, width) for s in (self, other)]
        if not self.use_cache:
            self.embeds = torch.cat([p[0] for p in parts])
        self.mask = torch.cat([p[1] for p in parts])
        self.positions = torch.cat([p[2] for p in parts])
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.hidden = torch.cat([self.hidden, other.hidden])
        if self.cache is not None:
            from transformers import DynamicCache

            layers = []
            for a, b in zip(self.cache.layers, other.cache.layers, strict=True):
                keys = torch.cat([_left_pad_kv(a.keys, width), _left_pad_kv(b.keys, width)])
                values = torch.cat([_left_pad_kv(a.values, width), _left_pad_kv(b.values, width)])
                layers.append((keys, values))
            self.cache = DynamicCache(ddp_cache_data=layers)


def _left_pad(rows: _Rows, width: int):
    """(embeds or None, mask, positions) of ``rows`` left-padded to ``width``."""
    extra = width - rows.mask.shape[1]
    r = rows.mask.shape[0]
    embeds = rows.embeds
    if extra and embeds is not None:
        embeds = torch.cat([embeds.new_zeros(r, extra, embeds.shape[2]), embeds], dim=1)
    if extra == 0:
        return embeds, rows.mask, rows.positions
    return (
        embeds,
        torch.cat([rows.mask.new_zeros(r, extra), rows.mask], dim=1),
        torch.cat([rows.positions.new_zeros(r, extra), rows.positions], dim=1),
    )


def _left_pad_kv(x: torch.Tensor, width: int) -> torch.Tensor:
    extra = width - x.shape[2]  # (B, h, T, d)
    return x if extra == 0 else F.pad(x, (0, 0, extra, 0))


def _embed_rows(model: FusionTransformer, prompts: Sequence[Prompt]):
    """Left-padded input embeddings (R, L, D) and mask (R, L) of prompts."""
    c = model.config
    width = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), width), c.pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p.ids) :] = torch.tensor(p.ids)
        mask[i, width - len(p.ids) :] = 1
    visual = [p.visual for p in prompts if p.visual is not None and len(p.visual)]
    visual = torch.cat(visual).to(model.device) if visual else None
    return model.embed(ids.to(model.device), visual), mask.to(model.device)


def _token_embeds(model: FusionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    return model.backbone.get_input_embeddings()(tokens)  # (R,) -> (R, D)


def _text_mask(c: FusionConfig, phase: str, vocab: int, device) -> torch.Tensor:
    """(V,) additive logits mask of a text phase: image codes, <eoi>, <img> and <pad> never;
    <boi> only where an image may start; <eos> not in ``text_to_image``."""
    allowed = torch.zeros(vocab, dtype=torch.bool, device=device)
    allowed[: c.text_vocab_size] = True
    for t in (c.pad_id, c.eoi_id, c.img_id, c.bos_id):
        allowed[t] = False
    if phase == "text":
        allowed[c.boi_id] = False
    if phase == "text_to_image":
        allowed[c.eos_id] = False
    mask = torch.zeros(vocab, device=device)
    return mask.masked_fill(~allowed, float("-inf"))


def decode(
    model: FusionTransformer,
    prompts: Sequence[Prompt],
    plan: Plan,
    sampling: Sampling | None = None,
    generators: Sequence[torch.Generator] | None = None,
    *,
    use_cache: bool = True,
    on_phase: Callable[[int, str], None] | None = None,
) -> list[Written]:
    """Continue each prompt by ``plan``; returns what each row wrote (see ``decode_stream``)."""
    out = [Written() for _ in prompts]
    for row, kind, value in decode_stream(
        model, prompts, plan, sampling, generators, use_cache=use_cache, on_phase=on_phase
    ):
        if kind == "eos":
            out[row].finished = True
        else:
            out[row].pieces.append((kind, value))
    return out


@torch.no_grad()
def decode_stream(
    model: FusionTransformer,
    prompts: Sequence[Prompt],
    plan: Plan,
    sampling: Sampling | None = None,
    generators: Sequence[torch.Generator] | None = None,
    *,
    use_cache: bool = True,
    on_phase: Callable[[int, str], None] | None = None,
) -> Iterator[tuple[int, str, Any]]:
    """Continue each prompt by ``plan``, yielding ``(row, kind, value)`` as soon as a piece
    is complete: ``("text", ids)`` at the end of a text phase, ``("image", codes (N,) or
    embeddings (N, visual_dim))`` at the end of an image, ``("eos", None)`` when the row
    wrote <eos>. ``on_phase(index, phase)`` runs before each phase (the story API reseeds
    its generators there). ``use_cache=False`` recomputes the whole sequence at every step:
    the reference the KV cache is tested against.
    """
    c = model.config
    s = sampling or Sampling()
    n = len(prompts)
    if n == 0:
        return
    if generators is not None and len(generators) != n:
        raise ValueError(f"{len(generators)} generators for {n} prompts")
    gens = list(generators) if generators is not None else [None] * n
    device = model.device
    vocab = c.vocab_size
    embeds, mask = _embed_rows(model, prompts)
    rows = _Rows(model, embeds, mask, use_cache)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    # whether each row's last input is <boi> (the prompt may end with it)
    at_boi = torch.tensor([p.ids[-1] == c.boi_id for p in prompts], device=device)
    images_written = torch.zeros(n, dtype=torch.long, device=device)

    def draw(logits: torch.Tensor, active: torch.Tensor, temperature, top_k, top_p):
        """Tokens (n,) for the active rows (others: pad), each from its own generator."""
        tokens = torch.full((n,), c.pad_id, dtype=torch.long, device=device)
        idx = active.nonzero().squeeze(1)
        if idx.numel():
            lg = process_logits(logits[idx], temperature, top_k, top_p)
            tokens[idx] = sample_tokens(
                lg, [gens[i] for i in idx.tolist()], greedy=temperature == 0
            )
        return tokens

    def row_noise(active: torch.Tensor, width: int) -> torch.Tensor:
        """Starting noise (n, width) of a diffusion head, each active row's from its own
        generator, scaled by the image temperature; zeros for the others."""
        noise = torch.zeros(n, width, device=device)
        for i in active.nonzero().squeeze(1).tolist():
            g = gens[i]
            noise[i] = torch.randn(width, generator=g, device=g.device if g else device)
        return noise * s.image_temperature

    def text_phase(phase: str, active: torch.Tensor):
        """Sample text in the active rows, yielding each row's text and <eos>; sets
        ``at_boi`` for the rows that started an image."""
        active = active.clone()
        written = [[] for _ in range(n)]
        base = _text_mask(c, phase, vocab, device)
        if phase == "free":  # no more images than the budget
            over = images_written >= plan.max_images
            base = base[None].repeat(n, 1)
            base[over, c.boi_id] = float("-inf")
        for step in range(plan.max_new_tokens):
            if not active.any():
                break
            logits = model.logits(rows.hidden).float() + base  # (n, V)
            tokens = draw(logits, active, s.temperature, s.top_k, s.top_p)
            if step == plan.max_new_tokens - 1:  # out of budget: end as the plan says
                end = c.boi_id if phase == "text_to_image" else c.eos_id
                stop = active & (tokens != c.boi_id) & (tokens != c.eos_id)
                tokens = torch.where(stop, torch.full_like(tokens, end), tokens)
            for i in active.nonzero().squeeze(1).tolist():
                t = int(tokens[i])
                if t == c.boi_id:
                    at_boi[i] = True
                elif t == c.eos_id:
                    done[i] = True
                else:
                    written[i].append(t)
            rows.step(_token_embeds(model, tokens), active)
            active = active & (tokens != c.boi_id) & (tokens != c.eos_id)
        for i in range(n):
            if written[i]:
                yield i, "text", written[i]
            if done[i] and not reported[i]:
                reported[i] = True
                yield i, "eos", None

    def image_phase(active: torch.Tensor):
        """Exactly N codes / embeddings in the active rows, then <eoi>; others wait."""
        nonlocal rows
        need_boi = active & ~at_boi
        if need_boi.any():
            boi = torch.full((n,), c.boi_id, dtype=torch.long, device=device)
            rows.step(_token_embeds(model, boi), need_boi)
        guided = s.guidance_scale != 1.0
        if guided:  # unconditional rows: <bos> [negative] <boi>, one batch with the rows
            null_ids = [c.bos_id, *(s.negative_ids or []), c.boi_id]
            null = _Rows(model, *_embed_rows(model, [Prompt(null_ids)] * n), use_cache)
            rows.extend(null)
        both = torch.cat([active, active]) if guided else active
        values = []
        for _ in range(c.image_tokens):
            h = rows.hidden
            if c.continuous:
                noise = row_noise(active, c.visual_dim) if c.diffusion_head else None
                value = model.next_embeddings(h, noise, s.guidance_scale)  # (n, visual_dim)
                nxt = model.visual_in(value.to(model.dtype))  # (n, D)
                if guided:
                    nxt = torch.cat([nxt, nxt])
            else:
                logits = model.image_logits(h).float()  # (R, K): only image codes
                if guided:
                    logits = guide(logits[:n], logits[n:], s.guidance_scale)
                value = draw(logits, active, s.image_temperature, s.image_top_k, s.image_top_p)
                token = value + c.image_offset  # (n,)
                nxt = _token_embeds(model, torch.cat([token, token]) if guided else token)
            values.append(value)
            rows.step(nxt, both)
        eoi = torch.full((rows.mask.shape[0],), c.eoi_id, dtype=torch.long, device=device)
        rows.step(_token_embeds(model, eoi), both)
        if guided:
            rows.select(torch.arange(n, device=device))
        images = torch.stack(values, dim=1).cpu()  # (n, N) or (n, N, visual_dim)
        images_written.add_(active.long())
        at_boi.zero_()
        for i in active.nonzero().squeeze(1).tolist():
            yield i, "image", images[i]

    reported = [False] * n  # <eos> yielded
    for index, phase in enumerate(plan.phases):
        live = ~done
        if not live.any():
            break
        if on_phase is not None:
            on_phase(index, phase)
        if phase == "image":
            yield from image_phase(live)
        elif phase in ("text", "text_to_image"):
            yield from text_phase(phase, live & ~at_boi)
        else:  # free: text, and an image whenever the model starts one, until <eos>
            while (~done).any():
                yield from text_phase("free", (~done) & ~at_boi)
                want = at_boi & ~done
                if not want.any():
                    break
                yield from image_phase(want)
