"""LoRA adapters from the diffusers ecosystem, loaded onto a pipeline or one model.

A spec is ``PATH[:SCALE]``: a ``.safetensors`` file, a folder holding one (e.g.
``pytorch_lora_weights.safetensors`` as ``save_lora_weights`` writes it), or a hub id;
SCALE defaults to 1. Several adapters are combined with their scales through peft
(diffusers' ``load_lora_weights`` / ``set_adapters``). Scale 0 leaves the model's output
exactly as without the adapter.

``load_loras`` takes a diffusers pipeline (anything with ``load_lora_weights``) or a
single diffusers model (a UNet or transformer, with ``load_lora_adapter``), so that
training recipes (DreamBooth, textual inversion) can reuse it on what they train.

``add_lora`` and ``save_lora`` are the training side: peft adapters on a UNet (and
optionally a CLIP text encoder), saved as diffusers' ``pytorch_lora_weights.safetensors``
with each adapter's config in the file's metadata (so its alpha comes back on loading).
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from anygen.errors import CheckpointError, UserInputError
from anygen.hub import default_file_modes

log = logging.getLogger(__name__)

ADAPTER_PREFIX = "anygen_lora"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # as diffusers' save_lora_weights
# The attention projections diffusers' DreamBooth-LoRA script adapts, per model family.
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# ... and, for --lora-targets all, every other linear and convolution of the UNet's blocks
# (as LoCon adapters do): the transformer blocks' projections and feed-forward layers and
# the ResNet blocks' convolutions, where a texture the base has never drawn can be learnt.
UNET_LORA_TARGETS_ALL = (
    *UNET_LORA_TARGETS,
    *("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),
    *("conv1", "conv2", "conv_shortcut"),
)
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class LoraSpec:
    source: str  # file, folder or hub id
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``PATH`` or ``PATH:SCALE``; a colon not followed by a number belongs to the path."""
        text = text.strip()
        if not text:
            raise UserInputError("empty --lora value: give PATH or PATH:SCALE")
        source, scale = text, 1.0
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                scale = float(tail)
                source = head
            except ValueError:
                pass
        return cls(source=source, scale=scale)

    def __post_init__(self) -> None:
        if not math.isfinite(self.scale):
            raise UserInputError(
                f"LoRA {self.source}: the scale must be a finite number, got {self.scale}"
            )


# the file name diffusers' ``save_lora_weights`` writes: a folder's default LoRA file
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"


def _lora_file(spec: LoraSpec) -> Path:
    """The one safetensors file a spec names (a file, a folder, a hub id, or a file in a
    hub repo as ``org/name/FILE.safetensors``); pickle files are refused."""
    from anygen.hub import PICKLE_SUFFIXES, download_file, resolve

    repo_file = _hub_file(spec.source)
    path = download_file(*repo_file) if repo_file else resolve(spec.source)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            extra = f" (it holds {', '.join(pickles)}: convert to safetensors)" if pickles else ""
            raise CheckpointError(f"no .safetensors LoRA file in {path}{extra}")
        if len(files) > 1 and (path / DIFFUSERS_LORA_FILE).is_file():
            return path / DIFFUSERS_LORA_FILE
        if len(files) > 1:
            names = ", ".join(f.name for f in files)
            raise CheckpointError(
                f"{path} holds several LoRA files ({names}): name one of them, as "
                f"{spec.source}/{files[0].name}"
            )
        return files[0]
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path} is not a .safetensors file; anygen loads LoRA weights from safetensors only"
        )
    return path


def load_loras(target, specs: Sequence[LoraSpec | str]) -> list[str]:
    """Load each LoRA of ``specs`` onto ``target`` (a diffusers pipeline, or a diffusers
    UNet/transformer) and activate them together with their scales; returns the adapter
    names. Raises ``CheckpointError`` for a file that does not fit the model."""
    specs = [s if isinstance(s, LoraSpec) else LoraSpec.parse(s) for s in specs]
    if not specs:
        return []
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UserInputError("--lora needs the peft package: pip install peft") from None
    is_pipeline = hasattr(target, "load_lora_weights")
    if not is_pipeline and not hasattr(target, "load_lora_adapter"):
        raise UserInputError(
            f"{type(target).__name__} does not take diffusers LoRA weights; --lora works "
            "with diffusers pipelines (Stable Diffusion, SDXL, SD3, Flux, ...)"
        )
    names = []
    for i, spec in enumerate(specs):
        file = _lora_file(spec)
        name = f"{ADAPTER_PREFIX}{i}"
        try:
            if is_pipeline:
                target.load_lora_weights(
                    os.fspath(file.parent), weight_name=file.name, adapter_name=name
                )
            else:
                target.load_lora_adapter(
                    os.fspath(file.parent),
                    weight_name=file.name,
                    adapter_name=name,
                    prefix=_model_prefix(target),
                )
        except (ValueError, KeyError, RuntimeError, OSError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(
                f"LoRA {file} does not fit {type(target).__name__}: {first}"
            ) from None
        if not _has_adapter(target, name):  # diffusers only warns when no key matched
            raise CheckpointError(
                f"LoRA {file} does not fit {type(target).__name__}: none of its weights "
                "names a part of this model (a LoRA made for another model family?)"
            )
        names.append(name)
        log.info("loaded LoRA %s as %s (scale %g)", file, name, spec.scale)
    target.set_adapters(names, [s.scale for s in specs])
    return names


def _has_adapter(target, name: str) -> bool:
    """Whether loading made adapter ``name`` on ``target`` (a pipeline or one model)."""
    if hasattr(target, "get_list_adapters"):
        return any(name in names for names in target.get_list_adapters().values())
    return name in (getattr(target, "peft_config", None) or {})


def _model_prefix(model) -> str:
    """The key prefix of a model's entries in a pipeline-level LoRA file."""
    name = type(model).__name__
    return "unet" if name.startswith("UNet") else "transformer"


def add_lora(model, rank: int, targets: Sequence[str], *, alpha: float | None = None) -> list:
    """Freeze ``model`` (a diffusers UNet or a transformers text encoder) and give it a
    peft LoRA adapter of ``rank`` on the ``targets`` projections; returns the trainable
    parameters. A starts Gaussian and B at zero, so the adapted model starts equal to the
    base one. ``alpha`` defaults to ``rank`` (scale 1)."""
    if rank < 1:
        raise UserInputError(f"LoRA rank must be >= 1, got {rank}")
    try:
        from peft import LoraConfig
    except ImportError:
        raise UserInputError("LoRA training needs the peft package: pip install peft") from None
    model.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        init_lora_weights="gaussian",
        target_modules=list(targets),
    )
    model.add_adapter(config)
    return [p for p in model.parameters() if p.requires_grad]


def save_lora(directory: str | os.PathLike, unet, text_encoder=None) -> Path:
    """Write the LoRA adapters of ``unet`` (and ``text_encoder``, if it has one) to
    ``directory/pytorch_lora_weights.safetensors`` in diffusers' format, through a
    temporary name renamed into place. ``load_loras`` and diffusers' ``load_lora_weights``
    read it back."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def layers_and_metadata(model) -> tuple[dict | None, dict | None]:
        if model is None or not getattr(model, "peft_config", None):
            return None, None
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
        return layers, model.peft_config["default"].to_dict()

    unet_layers, unet_meta = layers_and_metadata(unet)
    if unet_layers is None:
        raise UserInputError("save_lora: the UNet has no LoRA adapter (add_lora first)")
    text_layers, text_meta = layers_and_metadata(text_encoder)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp_name = f".tmp-{uuid.uuid4().hex[:8]}-{LORA_WEIGHTS_NAME}"
    target = directory / LORA_WEIGHTS_NAME
    try:
        StableDiffusionPipeline.save_lora_weights(
            directory,
            unet_lora_layers=unet_layers,
            text_encoder_lora_layers=text_layers,
            weight_name=tmp_name,
            safe_serialization=True,
            unet_lora_adapter_metadata=unet_meta,
            text_encoder_lora_adapter_metadata=text_meta,
        )
        default_file_modes(directory / tmp_name)
        os.replace(directory / tmp_name, target)
    finally:
        (directory / tmp_name).unlink(missing_ok=True)
    return target


def _hub_file(source: str) -> tuple[str, str] | None:
    """``(repo_id, filename)`` for ``org/name/FILE.safetensors`` that is not a local path."""
    from anygen.hub import _is_hub_id

    parts = source.split("/")
    if len(parts) < 3 or not source.endswith(".safetensors") or Path(source).expanduser().exists():
        return None
    if source.startswith((".", "/", "~")) or Path(parts[0]).expanduser().exists():
        return None  # a local path (a missing file in it is named by resolve)
    if not _is_hub_id("/".join(parts[:2])):
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])
