"""Generators behind one interface, and ``load_generator`` that picks the right one.

A model directory says what it is: a diffusers pipeline (``model_index.json``: anygen's
own and Stable Diffusion 1.x/2.x run on ``LatentDiffusion``, every other text-to-image or
editing pipeline on ``DiffusersTextToImage``); anygen's own models name their class in
``config.json``; transformers models their ``model_type`` (Janus, Emu3, Chameleon, any
image-text-to-text model: ``transformers_models``).

Every generator has ``generate``; those that can also have ``caption(images, options)``,
``answer(images, questions, options)`` and ``edit(image, instruction, options)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from anygen.errors import ModelNotFoundError, UserInputError
from anygen.pipelines.base import Generator, Options, Output, Segment
from anygen.userconfig import DEFAULT_MODEL as DEFAULT_MODEL  # re-exported
from anygen.userconfig import TASK_DEFAULTS

if TYPE_CHECKING:
    from anygen.pipelines.lora import LoraSpec

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_STORY_MODEL",
    "Generator",
    "Options",
    "Output",
    "Segment",
    "load_generator",
    "pick_device",
    "pick_dtype",
]

log = logging.getLogger(__name__)

DEFAULT_STORY_MODEL = TASK_DEFAULTS["story"]  # stories need a model that writes text and images
# diffusers pipelines whose loop anygen runs itself (text_to_image.LatentDiffusion)
LATENT_DIFFUSION_PIPELINES = ("StableDiffusionPipeline",)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(device: str | None) -> torch.device:
    """The requested device, or CUDA when available, else CPU; unknown names are errors."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserInputError(f"unknown device {device!r}; try cpu, cuda or cuda:1") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UserInputError(f"device {device!r}: anygen runs on cpu, cuda or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"device {device!r} asked for, but CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UserInputError(
            f"device {device!r} asked for, but this machine has {count} CUDA device"
            f"{'' if count == 1 else 's'} (cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserInputError(f"device {device!r} asked for, but MPS is not available here")
    return dev


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """fp32 on CPU by default, fp16 on CUDA; fp16 on CPU is refused (slow and lossy there)."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        result = DTYPES[dtype]
    except KeyError:
        raise UserInputError(
            f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}"
        ) from None
    if result == torch.float16 and device.type == "cpu":
        raise UserInputError("fp16 is not supported on CPU; use fp32 (default) or bf16")
    return result


def load_generator(
    model: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    loras: Sequence[LoraSpec | str] = (),
    embeddings: Sequence[str] = (),
    offload: bool = False,
    vae_tiling: bool = False,
    vae_slicing: bool = False,
    attention: str | None = None,
) -> Generator:
    """A generator for a bundled name, a catalogue name (``anygen models``), a local
    directory or a hub id; ``model``, ``device`` and ``dtype`` default to the user's
    config (``anygen.userconfig``), else ``shapes-ldm`` on the best device.

    What a directory is decides the class: ``model_index.json`` -> a diffusers pipeline
    (``LatentDiffusion`` for anygen's own and the Stable Diffusion 1.x/2.x family, else
    ``DiffusersTextToImage``); ``config.json`` -> anygen's own model (``_class_name``) or a
    transformers model (``model_type``: Janus, Emu3, Chameleon, any image-text-to-text).
    ``loras``, ``embeddings`` (textual inversion), ``offload``, ``vae_tiling``,
    ``vae_slicing`` and ``attention`` are applied at load (``anygen.pipelines.runtime``).
    A diffusers directory with anygen's ``anygen.json`` whose ``family`` is not ``ldm``
    (an InstructPix2Pix editor trained by ``recipes/instruct_edit.py``) runs on
    ``DiffusersTextToImage`` with that file's defaults.
    """
    from anygen.catalog import catalog_entry
    from anygen.hub import resolve, saved_class_name
    from anygen.pipelines.lora import LoraSpec
    from anygen.pipelines.runtime import Runtime, check_offload_device
    from anygen.userconfig import default_model, user_default

    name = model or default_model()
    dev = pick_device(device or user_default("device"))
    torch_dtype = pick_dtype(dtype or user_default("dtype"), dev)
    if offload:
        check_offload_device(dev)  # before minutes of loading
    path = Path(resolve(name))
    runtime = Runtime(
        loras=tuple(s if isinstance(s, LoraSpec) else LoraSpec.parse(s) for s in loras),
        embeddings=tuple(str(e) for e in embeddings),
        offload=offload,
        vae_tiling=vae_tiling,
        vae_slicing=vae_slicing,
        attention=attention,
    )
    entry = catalog_entry(name)
    defaults = dict(entry.defaults) if entry is not None else None
    log.info("loading %s from %s on %s (%s)", name, path, dev, torch_dtype)
    if (path / "model_index.json").is_file():
        from anygen.pipelines.diffusers_t2i import DiffusersTextToImage, read_model_index
        from anygen.pipelines.text_to_image import ANYGEN_FILE, LatentDiffusion

        meta = read_model_index(path)
        own = _anygen_defaults(path / ANYGEN_FILE)
        if own is not None and own.get("family", "ldm") != "ldm":
            own.pop("family")
            defaults = {**(defaults or {}), **own}
        elif own is not None or meta["_class_name"] in LATENT_DIFFUSION_PIPELINES:
            return LatentDiffusion.from_pretrained(
                path, name=name, device=dev, dtype=torch_dtype, runtime=runtime
            )
        return DiffusersTextToImage.from_pretrained(
            path, name=name, device=dev, dtype=torch_dtype, runtime=runtime, defaults=defaults
        )
    config = path / "config.json"
    family = saved_class_name(path, "a model") if config.is_file() else None
    if family == "PartiTransformer":
        from anygen.pipelines.parti import Parti

        runtime.refuse_for(name, "parti")
        parti = Parti.from_pretrained(path, name=name, device=dev, dtype=torch_dtype)
        return _with_attention(parti, runtime, parti.transformer, parti.image_tokenizer)
    if family == "FusionTransformer":
        from anygen.pipelines.fusion import Fusion

        runtime.refuse_for(name, "fusion")
        fusion = Fusion.from_pretrained(path, name=name, device=dev, dtype=torch_dtype)
        return _with_attention(fusion, runtime, fusion.transformer, fusion.images)
    if config.is_file():
        from anygen.pipelines.transformers_models import transformers_family

        klass = transformers_family(config)
        if klass is not None:
            return klass.from_pretrained(
                path, name=name, device=dev, dtype=torch_dtype, runtime=runtime, defaults=defaults
            )
    raise ModelNotFoundError(
        f"{name} ({path}) is not a model anygen can generate with"
        + (f": model class {family!r} is not one this version of anygen runs" if family else "")
    )


def _with_attention(generator, runtime, *parts):
    """``generator`` with ``--attention`` applied to the library models among its ``parts``
    (its transformers decoders, a diffusion decoder); ``auto`` leaves them as loaded."""
    if runtime.attention not in (None, "auto"):
        from anygen.pipelines.runtime import library_models, set_attention

        set_attention(library_models(*parts), runtime.attention)
    return generator


def _anygen_defaults(file: Path) -> dict | None:
    """anygen's ``anygen.json`` beside a diffusers ``model_index.json`` (None: absent)."""
    if not file.is_file():
        return None
    from anygen.hub import read_json_object

    return read_json_object(file)
