"""Generators behind one interface, and ``load_generator`` that picks the right one.

A model directory says what it is: a diffusers pipeline (``model_index.json``) runs on
the ``ldm`` path; anygen's own models name their family in ``config.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from anygen.errors import ModelNotFoundError, UserInputError
from anygen.pipelines.base import Generator, Options, Output, Segment

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

DEFAULT_MODEL = "shapes-ldm"
DEFAULT_STORY_MODEL = "shapes-fusion"  # stories need a model that writes text and images
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(device: str | None) -> torch.device:
    """The requested device, or CUDA when available, else CPU; unknown names are errors."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserInputError(f"unknown device {device!r}; try cpu, cuda or cuda:1") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"device {device!r} asked for, but CUDA is not available here")
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
) -> Generator:
    """A generator for a bundled name, a local directory or a hub id."""
    from anygen.hub import resolve

    name = model or DEFAULT_MODEL
    path = Path(resolve(name))
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    if (path / "model_index.json").is_file():
        from anygen.pipelines.text_to_image import LatentDiffusion

        return LatentDiffusion.from_pretrained(path, name=name, device=dev, dtype=torch_dtype)
    config = path / "config.json"
    family = None
    if config.is_file():
        try:
            family = json.loads(config.read_text()).get("_class_name")
        except (json.JSONDecodeError, AttributeError):
            raise ModelNotFoundError(f"{config} is not a valid JSON config") from None
    if family == "PartiTransformer":
        from anygen.pipelines.parti import Parti

        return Parti.from_pretrained(path, name=name, device=dev, dtype=torch_dtype)
    if family == "FusionTransformer":
        from anygen.pipelines.fusion import Fusion

        return Fusion.from_pretrained(path, name=name, device=dev, dtype=torch_dtype)
    raise ModelNotFoundError(
        f"{name} ({path}) is not a model anygen can generate with"
        + (f": model class {family!r} cannot generate in by this version" if family else "")
    )
