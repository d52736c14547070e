"""LoRA adapters from the diffusers ecosystem, loaded onto a pipeline or one model.

A spec is ``PATH[:SCALE]``: a ``.safetensors`` file, a folder holding one (e.g.
``pytorch_lora_weights.safetensors`` as ``save_lora_weights`` writes it), or a hub id;
SCALE defaults to 1. Several adapters are combined with their scales through peft
(diffusers' ``load_lora_weights`` / ``set_adapters``). Scale 0 leaves the model's output
exactly as without the adapter.

``load_loras`` takes a diffusers pipeline (anything with ``load_lora_weights``) or a
single diffusers model (a UNet or transformer, with ``load_lora_adapter``), so that
training recipes (DreamBooth, textual inversion) can reuse it on what they train.

``add_lora`` and ``save_lora`` are the training side: peft adapters on a UNet or a DiT
(and optionally a CLIP text encoder), saved as diffusers' ``pytorch_lora_weights.safetensors``
with each adapter's config in the file's metadata (so its alpha comes back on loading).

diffusers has no LoRA loader for PixArt's pipelines and transformer; ``load_loras`` loads
into those through peft itself (``inject_adapter_in_model``), the same files and scales.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
import warnings
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
    from anygen.hub import PICKLE_SUFFIXES, download_file, resolve_add_on

    repo_file = _hub_file(spec.source)
    path = download_file(*repo_file) if repo_file else resolve_add_on(spec.source, "LoRA")
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
        models = _peft_models(target)
        if not models:
            raise UserInputError(
                f"{type(target).__name__} does not take diffusers LoRA weights; --lora works "
                "with diffusers pipelines (Stable Diffusion, SDXL, SD3, Flux, PixArt, ...)"
            )
        return _load_with_peft(models, specs)
    names = []
    for i, spec in enumerate(specs):
        file = _lora_file(spec)
        name = f"{ADAPTER_PREFIX}{i}"
        if is_pipeline:
            _check_components(file, target)
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


# The pipeline components a LoRA file's keys may name (its first key part), in the order
# diffusers' own loaders take them.
LORA_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


def _check_components(file: Path, pipe) -> None:
    """Refuse a file with weights for a denoiser the pipeline lacks (a DiT's LoRA on a
    UNet pipeline): diffusers would load its text-encoder part and drop the rest silently."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(file), framework="pt") as f:
            prefixes = {key.split(".", 1)[0] for key in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"LoRA {file} is not a readable safetensors file: {e}") from None
    components = getattr(pipe, "components", None) or {}
    missing = sorted(p for p in prefixes & {"unet", "transformer"} if components.get(p) is None)
    if missing:
        raise CheckpointError(
            f"LoRA {file} does not fit {type(pipe).__name__}: it adapts a {missing[0]}, which "
            "this pipeline does not have (a LoRA made for another model family?)"
        )


def _peft_models(target) -> dict:
    """The models of ``target`` that ``_load_with_peft`` loads LoRA weights into, by key
    prefix: a pipeline's components (PixArt's pipelines, which diffusers gives no LoRA
    loader), or one diffusers model without ``load_lora_adapter`` (PixArt's transformer)."""
    import torch.nn as nn

    if isinstance(target, nn.Module):
        return {_model_prefix(target): target}
    components = getattr(target, "components", None)
    if not isinstance(components, dict):
        return {}
    models = {k: components.get(k) for k in LORA_COMPONENTS}
    models = {k: m for k, m in models.items() if isinstance(m, nn.Module)}
    return models if {"unet", "transformer"} & models.keys() else {}


def _read_lora_file(file: Path) -> tuple[dict, dict]:
    """The tensors of a LoRA safetensors file and its adapter configs (diffusers writes
    them in the file's metadata as ``lora_adapter_metadata``, keys ``PREFIX.FIELD``)."""
    import json

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(file), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
            raw = (f.metadata() or {}).get("lora_adapter_metadata")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"LoRA {file} is not a readable safetensors file: {e}") from None
    try:
        meta = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise CheckpointError(f"LoRA {file}: its adapter metadata is not JSON") from None
    return state, meta if isinstance(meta, dict) else {}


def _lora_config(state: dict, meta: dict):
    """The peft ``LoraConfig`` of one model's part of a LoRA file: from the file's metadata
    where it has one, else inferred from the weights by diffusers' own rule
    (``get_peft_kwargs``: the most common ``lora_B`` rank, alpha equal to each rank)."""
    import dataclasses

    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft import LoraConfig

    if meta:
        fields = {f.name for f in dataclasses.fields(LoraConfig)}
        return LoraConfig(**{k: v for k, v in meta.items() if k in fields})
    ranks = {k: v.shape[1] for k, v in state.items() if "lora_B" in k and v.ndim > 1}
    if not ranks:
        raise ValueError("it holds no lora_A / lora_B weight pairs")
    return LoraConfig(**get_peft_kwargs(ranks, network_alpha_dict=None, peft_state_dict=state))


def _load_with_peft(models: dict, specs: Sequence[LoraSpec]) -> list[str]:
    """``load_loras`` through peft itself, for models diffusers has no LoRA loader for:
    each file's ``PREFIX.`` keys are injected into the model of that prefix as adapter
    ``anygen_loraI``, then the adapters are activated together with their scales."""
    from diffusers.utils import convert_state_dict_to_peft
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = []
    for i, spec in enumerate(specs):
        file = _lora_file(spec)
        name = f"{ADAPTER_PREFIX}{i}"
        state, meta = _read_lora_file(file)
        unclaimed = set(state)
        for prefix, model in models.items():
            part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(f"{prefix}.")}
            if not part:
                continue
            unclaimed -= {f"{prefix}.{k}" for k in part}
            part_meta = {
                k[len(prefix) + 1 :]: v for k, v in meta.items() if k.startswith(f"{prefix}.")
            }
            try:
                if not any("lora" in k for k in part):
                    raise ValueError("it holds no lora_A / lora_B weight pairs")
                if not any(".lora_A." in k for k in part):  # diffusers' older key names
                    part = convert_state_dict_to_peft(part)
                with warnings.catch_warnings():  # a second adapter is what is asked for
                    warnings.filterwarnings("ignore", "Already found a `peft_config`")
                    config = _lora_config(part, part_meta)
                    inject_adapter_in_model(config, model, adapter_name=name)
                result = set_peft_model_state_dict(model, part, adapter_name=name)
            except (ValueError, KeyError, RuntimeError, TypeError) as e:
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise CheckpointError(
                    f"LoRA {file} does not fit {type(model).__name__}: {first}"
                ) from None
            unexpected = [k for k in result.unexpected_keys if "lora_" in k]
            if unexpected:
                raise CheckpointError(
                    f"LoRA {file} does not fit {type(model).__name__}: {len(unexpected)} of its"
                    f" weights name no part of it, e.g. {unexpected[0]}"
                )
        if unclaimed == set(state):
            raise CheckpointError(
                f"LoRA {file} does not fit this model: its keys start with none of "
                f"{', '.join(p + '.' for p in models)} (a LoRA made for another model family?)"
            )
        if unclaimed:
            log.warning("LoRA %s: %d weights for no model here ignored", file, len(unclaimed))
        names.append(name)
        log.info("loaded LoRA %s as %s (scale %g)", file, name, spec.scale)
    for model in models.values():
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.set_adapter(names, inference_mode=True)  # loaded, not to train
                for name, spec in zip(names, specs, strict=True):
                    module.set_scale(name, spec.scale)
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
    if hasattr(model, "add_adapter"):  # diffusers' and transformers' peft integrations
        model.add_adapter(config)
    else:  # a diffusers model without one (PixArt's transformer): peft itself
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, model, adapter_name="default")
    return [p for p in model.parameters() if p.requires_grad]


def save_lora(directory: str | os.PathLike, denoiser, text_encoder=None) -> Path:
    """Write the LoRA adapters of ``denoiser`` (a UNet or a DiT; and ``text_encoder``, if
    it has one) to ``directory/pytorch_lora_weights.safetensors`` in diffusers' format,
    through a temporary name renamed into place: a UNet's as diffusers' Stable Diffusion
    DreamBooth-LoRA script writes them (``unet.`` keys), a transformer's as its SD3 script
    does (``transformer.`` keys, peft names), each adapter's config in the metadata.
    ``load_loras`` and diffusers' ``load_lora_weights`` read it back."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    is_unet = _model_prefix(denoiser) == "unet"

    def layers_and_metadata(model) -> tuple[dict | None, dict | None]:
        if model is None or not getattr(model, "peft_config", None):
            return None, None
        layers = get_peft_model_state_dict(model)
        if is_unet:
            layers = convert_state_dict_to_diffusers(layers)
        return layers, model.peft_config["default"].to_dict()

    denoiser_layers, denoiser_meta = layers_and_metadata(denoiser)
    if denoiser_layers is None:
        raise UserInputError(
            f"save_lora: the {type(denoiser).__name__} has no LoRA adapter (add_lora first)"
        )
    text_layers, text_meta = layers_and_metadata(text_encoder)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp_name = f".tmp-{uuid.uuid4().hex[:8]}-{LORA_WEIGHTS_NAME}"
    target = directory / LORA_WEIGHTS_NAME
    common = {
        "weight_name": tmp_name,
        "safe_serialization": True,
        "text_encoder_lora_layers": text_layers,
        "text_encoder_lora_adapter_metadata": text_meta,
    }
    try:
        if is_unet:
            StableDiffusionPipeline.save_lora_weights(
                directory,
                unet_lora_layers=denoiser_layers,
                unet_lora_adapter_metadata=denoiser_meta,
                **common,
            )
        else:
            StableDiffusion3Pipeline.save_lora_weights(
                directory,
                transformer_lora_layers=denoiser_layers,
                transformer_lora_adapter_metadata=denoiser_meta,
                **common,
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
