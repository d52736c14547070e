"""The one attention entry point for anygen's own modules, and bridges that give diffusers
and transformers components the same choice of backend.

    y = attention(q, k, v, is_causal=True)        # q, k, v: (B, nh, T, hs) -> (B, nh, T, hs)
    with attention_backend("math"):                # every attention() call inside uses "math"
        y_ref = attention(q, k, v, is_causal=True)

Backends (``BACKENDS``):
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``, the default; torch picks
  its flash, memory-efficient or math kernel.
- ``math``: the explicit formula ``softmax(q k^T * scale + mask) v``, accumulated in fp32.
  Slow; the reference every other backend is tested against.
- ``xformers``: ``xformers.ops.memory_efficient_attention``; CUDA only, installed with the
  optional ``gpu`` extra.
- ``auto`` (the default): ``xformers`` for CUDA tensors where xformers imports and its
  kernels run on that device (probed once per device), else ``sdpa``. ``auto_backend``
  says what it picks; ``resolve_backend`` turns any name into a concrete backend.

Masks follow SDPA: ``attn_mask`` is bool (True = may attend) or float (added to the scores),
broadcastable to (B, nh, Tq, Tk). ``is_causal`` aligns the causal mask to the bottom right:
the Tq queries are the last Tq of the Tk key positions, as with a KV cache (for Tq == Tk
this is the usual lower-triangular mask; a single query attends to every key). It may be
combined with ``attn_mask``. A query row with no key to attend to gives zeros, as in SDPA.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from anygen.errors import UserInputError

logger = logging.getLogger(__name__)

AUTO = "auto"  # xformers where usable (CUDA + package + kernels), else sdpa
DEFAULT_BACKEND = AUTO
_backend: ContextVar[str] = ContextVar("anygen_attention_backend", default=DEFAULT_BACKEND)


# -----------------------------------------------------------------------------
# masks


def _causal_mask(t_q: int, t_k: int, device: torch.device) -> torch.Tensor:
    """(Tq, Tk) bool, True where query i may see key j: j <= i + (Tk - Tq)."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


def _empty_rows(mask: torch.Tensor) -> torch.Tensor:
    """(..., Tq, 1) bool: query rows that may attend to no key."""
    if mask.dtype == torch.bool:
        return ~mask.any(dim=-1, keepdim=True)
    return torch.isneginf(mask).all(dim=-1, keepdim=True)


def _merged_mask(
    attn_mask: torch.Tensor | None, is_causal: bool, t_q: int, t_k: int, device: torch.device
) -> torch.Tensor | None:
    """``attn_mask`` with the causal mask folded in (bool stays bool, float gets -inf)."""
    if not is_causal or t_q == 1:  # one query is the last position: it sees every key
        return attn_mask
    causal = _causal_mask(t_q, t_k, device)  # (Tq, Tk)
    if attn_mask is None:
        return causal
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return attn_mask.masked_fill(~causal, float("-inf"))


# -----------------------------------------------------------------------------
# backends: each takes q, k, v (B, nh, T, hs) and returns (B, nh, Tq, hs)


def _sdpa(q, k, v, attn_mask, is_causal, dropout_p, scale):
    t_q, t_k = q.size(-2), k.size(-2)
    if is_causal and attn_mask is None and t_q == t_k:
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale
        )
    mask = _merged_mask(attn_mask, is_causal, t_q, t_k, q.device)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)  # SDPA wants a float mask in the query's dtype
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def _math(q, k, v, attn_mask, is_causal, dropout_p, scale):
    scale = q.size(-1) ** -0.5 if scale is None else scale
    att = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, nh, Tq, Tk)
    mask = _merged_mask(attn_mask, is_causal, q.size(-2), k.size(-2), q.device)
    if mask is not None:
        att = (
            att.masked_fill(~mask, float("-inf"))
            if mask.dtype == torch.bool
            else att + mask.float()
        )
        # a row with no key to attend to gives 0, as SDPA, not NaN (forward and backward)
        empty = _empty_rows(mask)  # (..., Tq, 1)
        att = att.masked_fill(empty, 0.0)
    att = att.softmax(dim=-1)
    if mask is not None:
        att = att.masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p)
    return (att @ v.float()).to(q.dtype)  # (B, nh, Tq, hs)


@functools.cache
def _xformers_ops():
    try:
        import xformers.ops as xops
    except (ImportError, OSError, RuntimeError) as e:
        raise UserInputError(
            f"attention backend 'xformers' is not usable here ({e}); it needs the optional "
            "CUDA extra (pip install 'anygen[gpu]'); use 'sdpa' instead"
        ) from e
    return xops


def _xformers(q, k, v, attn_mask, is_causal, dropout_p, scale):
    if q.device.type != "cuda":
        raise UserInputError(
            f"attention backend 'xformers' runs on CUDA tensors only, got {q.device.type} "
            "tensors; use 'sdpa' on this device"
        )
    xops = _xformers_ops()
    B, nh, t_q, _ = q.shape
    t_k = k.size(-2)
    if attn_mask is None and is_causal and t_q > 1:
        bias = (
            xops.LowerTriangularMask()
            if t_q == t_k
            else xops.fmha.attn_bias.LowerTriangularFromBottomRightMask()
        )
    else:
        mask = _merged_mask(attn_mask, is_causal, t_q, t_k, q.device)
        bias = None
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                    ~mask, float("-inf")
                )
            # xformers wants a full (B, nh, Tq, Tk) bias whose rows start 16-byte aligned:
            # allocate Tk rounded up to 8 and use a view of the first Tk columns
            padded = torch.empty(B, nh, t_q, -(-t_k // 8) * 8, dtype=q.dtype, device=q.device)
            bias = padded[..., :t_k]
            bias.copy_(mask.to(q.dtype).expand(B, nh, t_q, t_k))
    y = xops.memory_efficient_attention(
        q.transpose(1, 2),  # (B, Tq, nh, hs)
        k.transpose(1, 2),  # (B, Tk, nh, hs)
        v.transpose(1, 2),
        attn_bias=bias,
        p=dropout_p,
        scale=scale,
    )  # (B, Tq, nh, hs)
    y = y.transpose(1, 2)  # (B, nh, Tq, hs)
    if isinstance(bias, torch.Tensor):  # a row with no key to attend to gives 0, as SDPA
        y = y.masked_fill(_empty_rows(bias), 0.0)
    return y


BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "sdpa": _sdpa,
    "math": _math,
    "xformers": _xformers,
}


def available_backends() -> list[str]:
    """The backends that can run on this machine (``xformers`` needs CUDA and the package)."""
    names = ["sdpa", "math"]
    if torch.cuda.is_available():
        try:
            _xformers_ops()
            names.append("xformers")
        except UserInputError as e:
            logger.debug("xformers unavailable: %s", e)
    return names


# -----------------------------------------------------------------------------
# automatic choice


def _xformers_probe(device: torch.device) -> bool:
    """Whether xformers imports and its memory-efficient kernel runs on ``device``.

    An xformers wheel built for another torch or CUDA imports (with a warning) but has no
    kernels, and fails only at the first call: so call it once, on a (1, 1, 1, 64) fp16
    problem, and treat any failure as "not usable"."""
    try:
        xops = _xformers_ops()
        q = torch.zeros(1, 1, 1, 64, device=device, dtype=torch.float16)  # (B, T, nh, hs)
        xops.memory_efficient_attention(q, q, q)
    except (UserInputError, NotImplementedError, RuntimeError, ValueError, AssertionError) as e:
        logger.info("xformers is not usable on %s, attention uses sdpa: %s", device, e)
        return False
    return True


_xformers_usable: dict[str, bool] = {}  # device -> probe result, filled on first use


def xformers_usable(device: torch.device | str) -> bool:
    """xformers can run on ``device``: a CUDA device, the package, and working kernels
    (probed on first use per device; the answer is kept for the process)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    if key not in _xformers_usable:
        _xformers_usable[key] = _xformers_probe(device)
    return _xformers_usable[key]


def auto_backend(device: torch.device | str) -> str:
    """What ``auto`` runs on ``device``: ``xformers`` where usable, else ``sdpa``."""
    return "xformers" if xformers_usable(device) else "sdpa"


def resolve_backend(name: str | None, device: torch.device | str) -> str:
    """The concrete backend for ``name`` (None: the current ``attention_backend``) on
    ``device``: ``auto`` becomes ``xformers`` or ``sdpa``; others are checked."""
    name = _check_backend(name)
    return auto_backend(device) if name == AUTO else name


def _check_backend(name: str | None) -> str:
    name = _backend.get() if name is None else name
    if name == AUTO:
        return name
    if name not in BACKENDS:
        raise UserInputError(
            f"unknown attention backend {name!r}; choose one of {AUTO}, {', '.join(BACKENDS)}"
        )
    if name == "xformers":
        _xformers_ops()
        if not torch.cuda.is_available():
            raise UserInputError(
                "attention backend 'xformers' needs a CUDA device and none is available; use 'sdpa'"
            )
    return name


@contextmanager
def attention_backend(name: str) -> Iterator[str]:
    """Use backend ``name`` (or ``auto``) for every ``attention()`` call without an explicit
    ``backend`` inside the block (this thread / task only)."""
    token = _backend.set(_check_backend(name))
    try:
        yield name
    finally:
        _backend.reset(token)


def _check_inputs(q, k, v, attn_mask, dropout_p):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be (B, nh, T, hs), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.size(-1) != k.size(-1):
        raise ValueError(
            "q, k, v must share B and nh, k and v their length T and q and k their head size; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "(repeat k and v heads for grouped-query attention)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if attn_mask is not None and attn_mask.dim() > 4:
        raise ValueError(
            f"attn_mask must broadcast to (B, nh, Tq, Tk), got {tuple(attn_mask.shape)}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention: q (B, nh, Tq, hs), k (B, nh, Tk, hs), v (B, nh, Tk, hv)
    -> (B, nh, Tq, hv).

    ``scale`` defaults to ``hs ** -0.5``. ``dropout_p`` is applied whenever it is non-zero:
    pass ``p if self.training else 0.0``. ``backend`` overrides ``attention_backend()``;
    ``auto`` (the default) picks by the device of ``q``.
    """
    _check_inputs(q, k, v, attn_mask, dropout_p)
    if is_causal and q.size(-2) > k.size(-2):
        raise ValueError(
            f"is_causal needs Tq <= Tk (queries are the last Tq key positions), got "
            f"Tq={q.size(-2)}, Tk={k.size(-2)}"
        )
    name = resolve_backend(backend, q.device)
    return BACKENDS[name](q, k, v, attn_mask, is_causal, dropout_p, scale)


# -----------------------------------------------------------------------------
# diffusers


def _classic_processors() -> dict[tuple[type, ...], dict[str, type]]:
    """diffusers' classic processor families (plain, added-KV), each mapping a backend to
    its processor class."""
    from diffusers.models.attention_processor import (
        AttnAddedKVProcessor,
        AttnAddedKVProcessor2_0,
        AttnProcessor,
        AttnProcessor2_0,
        SlicedAttnAddedKVProcessor,
        SlicedAttnProcessor,
        XFormersAttnAddedKVProcessor,
        XFormersAttnProcessor,
    )

    plain = (AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor, SlicedAttnProcessor)
    added_kv = (
        AttnAddedKVProcessor,
        AttnAddedKVProcessor2_0,
        XFormersAttnAddedKVProcessor,
        SlicedAttnAddedKVProcessor,
    )
    return {
        plain: {"sdpa": AttnProcessor2_0, "math": AttnProcessor, "xformers": XFormersAttnProcessor},
        added_kv: {
            "sdpa": AttnAddedKVProcessor2_0,
            "math": AttnAddedKVProcessor,
            "xformers": XFormersAttnAddedKVProcessor,
        },
    }


def has_classic_attention(model: nn.Module) -> bool:
    """Every attention layer of a diffusers model has a classic processor (``AttnProcessor``,
    ``AttnProcessor2_0``, ``XFormersAttnProcessor``, their added-KV and sliced variants):
    the UNets, VAEs and PixArt, which xformers has long run under diffusers. False for
    layers on diffusers' attention dispatcher (Flux, ...) and for joint, LoRA or custom
    processors; also False for a model without attention layers."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    classic = tuple(t for family in _classic_processors() for t in family)
    layers = [m for m in model.modules() if isinstance(m, (Attention, AttentionModuleMixin))]
    # exact types, as set_diffusers_attention maps them: a subclass may change the maths
    return bool(layers) and all(type(getattr(m, "processor", None)) in classic for m in layers)


def set_diffusers_attention(
    model: nn.Module, backend: str, device: torch.device | str | None = None
) -> int:
    """Switch every attention layer of a diffusers model (UNet, DiT, VAE, ...) to ``backend``;
    returns how many layers were switched.

    Classic ``Attention`` layers get ``AttnProcessor2_0`` (sdpa), ``AttnProcessor`` (math)
    or ``XFormersAttnProcessor`` (and the added-KV variants); layers built on diffusers'
    attention dispatcher get ``set_attention_backend`` ("native", "_native_math",
    "xformers") per layer, which changes no process-wide default. Layers with any other
    processor (IP-Adapter, LoRA, custom) raise a ``UserInputError`` before anything changes.
    ``device`` is where the model will run (default: where its parameters are; a model
    offloaded to the CPU runs on the accelerator it is moved to), and ``auto`` resolves by it.
    """
    param = next(model.parameters(), None)
    if device is None:
        run_on = param.device if param is not None else torch.device("cpu")
        off_cuda = any(p.device.type != "cuda" for p in model.parameters())
    else:
        run_on = torch.device(device)
        off_cuda = run_on.type != "cuda"
    backend = resolve_backend(backend, run_on)
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    if backend == "xformers" and off_cuda:
        raise UserInputError(
            "attention backend 'xformers' runs on CUDA only: move the model to a CUDA device first"
        )
    processors = _classic_processors()
    dispatch_names = {"sdpa": "native", "math": "_native_math", "xformers": "xformers"}

    plan: list[Callable[[], None]] = []
    unsupported: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, (Attention, AttentionModuleMixin)):
            continue
        processor = getattr(module, "processor", None)
        family = next((f for f in processors if type(processor) in f), None)
        if family is not None:
            new = processors[family][backend]
            plan.append(functools.partial(module.set_processor, new()))
        elif hasattr(processor, "_attention_backend") and hasattr(module, "set_attention_backend"):
            plan.append(functools.partial(module.set_attention_backend, dispatch_names[backend]))
        else:
            unsupported.append(f"{name or '<root>'} ({type(processor).__name__})")
    if unsupported:
        shown = ", ".join(unsupported[:5]) + (" ..." if len(unsupported) > 5 else "")
        raise UserInputError(
            f"cannot switch {type(model).__name__} to attention backend {backend!r}: "
            f"{len(unsupported)} layers have processors anygen does not map: {shown}"
        )
    for switch in plan:
        switch()
    logger.debug(
        "switched %d attention layers of %s to %s", len(plan), type(model).__name__, backend
    )
    return len(plan)


# -----------------------------------------------------------------------------
# transformers


def transformers_attn_implementation(
    backend: str | None = None, device: torch.device | str = "cpu"
) -> str:
    """The transformers ``attn_implementation`` for an anygen backend: "sdpa", "eager"
    (math), or for xformers a function registered in ``transformers.AttentionInterface``.

    Use it as ``Model.from_pretrained(..., attn_implementation=name)`` or
    ``model.set_attn_implementation(name)``. ``auto`` resolves by ``device`` (default CPU).
    """
    backend = resolve_backend(backend, device)
    if backend == "sdpa":
        return "sdpa"
    if backend == "math":
        return "eager"
    return _register_transformers_attention(backend)


def _register_transformers_attention(backend: str) -> str:
    """Register ``attention(..., backend=backend)`` with transformers as "anygen_<backend>",
    with the same (bool) masks as its "sdpa"; returns the name. Registering is global to
    transformers and idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    key = f"anygen_{backend}"

    def forward(
        module: nn.Module,
        query: torch.Tensor,  # (B, nh, Tq, hs)
        key_states: torch.Tensor,  # (B, nkv, Tk, hs)
        value: torch.Tensor,  # (B, nkv, Tk, hs)
        attention_mask: torch.Tensor | None,  # bool (B, 1, Tq, Tk) or None
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if kwargs.get("softcap") is not None:
            raise ValueError(f"attn_implementation {key!r} does not support softcap; use 'eager'")
        groups = getattr(module, "num_key_value_groups", 1)
        if groups > 1:  # grouped-query attention: (B, nkv, Tk, hs) -> (B, nh, Tk, hs)
            key_states = key_states.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        t_q = query.size(2)
        # as transformers' sdpa: causal only for a prefill without a mask, and a static
        # cache's unused tail dropped (its causal mask is aligned top-left)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(causal) and attention_mask is None and t_q > 1
        if causal and key_states.size(2) > t_q:
            key_states, value = key_states[:, :, :t_q], value[:, :, :t_q]
        y = attention(
            query,
            key_states,
            value,
            attn_mask=attention_mask,
            is_causal=causal,
            dropout_p=dropout,
            scale=scaling,
            backend=backend,
        )  # (B, nh, Tq, hs)
        return y.transpose(1, 2).contiguous(), None  # (B, Tq, nh, hs)

    AttentionInterface.register(key, forward)
    AttentionMaskInterface.register(key, sdpa_mask)
    return key
