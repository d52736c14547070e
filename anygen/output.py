"""Writing results: PNGs with their generation settings, never a half-written file."""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image, PngImagePlugin

from anygen.errors import UserInputError

# PNG text-chunk keys, in the order a reader sees them.
PNG_KEYS = ("prompt", "negative_prompt", "seed", "model", "steps", "guidance_scale", "scheduler")


def check_writable(path: Path, *, overwrite: bool = False, make_parent: bool = False) -> None:
    """Fail now, with the path in the message, if ``path`` cannot be written later."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserInputError(f"{path} exists; pass --overwrite to replace it")
    if path.exists() and path.is_dir():
        raise UserInputError(f"{path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if make_parent:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserInputError(f"cannot create folder {parent}: {e.strerror}") from None
    if not parent.is_dir():
        raise UserInputError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserInputError(f"cannot write {path}: folder {parent} is not writable")


def save_png(
    image: Image.Image, path: Path, *, metadata: dict | None = None, overwrite: bool = False
) -> Path:
    """Write ``image`` to ``path`` via a temporary name, with ``metadata`` in text chunks.

    Each key of PNG_KEYS present in ``metadata`` gets its own chunk; the whole record is
    also stored as JSON under ``anygen``.
    """
    path = Path(path)
    check_writable(path, overwrite=overwrite)
    info = PngImagePlugin.PngInfo()
    for key in PNG_KEYS:
        if metadata and metadata.get(key) is not None:
            info.add_text(key, str(metadata[key]))
    if metadata:
        info.add_text("anygen", json.dumps(metadata))
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserInputError(f"cannot write {path}: {e.strerror}") from None
    return path


def read_png_metadata(path: Path) -> dict:
    """The ``anygen`` record written by ``save_png`` (empty when there is none)."""
    with Image.open(path) as image:
        text = image.text.get("anygen") if hasattr(image, "text") else None
    return json.loads(text) if text else {}
