"""Writing results: PNGs with their generation settings, never a half-written file."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
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
    with _removed_on_failure(tmp, path):
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    return path


@contextmanager
def _removed_on_failure(tmp: Path, path: Path):
    """Whatever stops a write (a full disk, an image PNG cannot hold, Ctrl-C) removes the
    temporary file; OS errors become one line naming ``path``."""
    try:
        yield
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            # Pillow raises OSError without an errno for images PNG cannot hold (mode F)
            raise UserInputError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def read_png_metadata(path: Path) -> dict:
    """The ``anygen`` record written by ``save_png`` (empty when there is none)."""
    with Image.open(path) as image:
        text = image.text.get("anygen") if hasattr(image, "text") else None
    return json.loads(text) if text else {}


# ---------------------------------------------------------------------------- stories

STORY_FILES = ("story.json", "story.md", "story.html")


def check_story_dir(folder: Path, *, overwrite: bool = False) -> Path:
    """Create ``folder`` for a story, or fail now if it holds one (without ``overwrite``)
    or cannot be written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise UserInputError(f"{folder} is not empty; pass --overwrite to write a story there")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserInputError(f"cannot create folder {folder}: {e.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise UserInputError(f"cannot write into {folder}")
    return folder


def picture_name(index: int) -> str:
    """File name of a story's picture ``index`` (from 1)."""
    return f"picture-{index:02d}.png"


def write_text_atomic(path: Path, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with _removed_on_failure(tmp, path):
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return path


def story_record(story, files: list[str]) -> dict:
    """The JSON record of a story: segments in order (text, or an image file) with the
    seed of the scene each image ends, the model, the seed and whether a segment was given;
    an opening picture that was the best of several records how many, the seed that drew
    it and its score (``rerank``)."""
    opening = getattr(story, "opening", None)
    segments, images = [], 0
    given_images = sum(1 for s in story.segments[: story.given] if not isinstance(s, str))
    for i, seg in enumerate(story.segments):
        given = i < story.given
        if isinstance(seg, str):
            segments.append({"type": "text", "text": seg, "given": given})
        else:
            item = {"type": "image", "file": files[images], "given": given}
            if not given:  # generated scene k ends with generated picture k
                item["seed"] = story.seeds[images - given_images]
                if opening and images == given_images:  # the opening picture
                    item["rerank"] = opening
            segments.append(item)
            images += 1
    return {
        "model": story.model,
        "seed": story.seed,
        "settings": dict(getattr(story, "settings", None) or {}),
        "scene_seeds": story.seeds,
        "segments": segments,
    }


def story_markdown(record: dict, title: str) -> str:
    lines = [f"# {title}", ""]
    for seg in record["segments"]:
        if seg["type"] == "text":
            lines += [seg["text"], ""]
        else:
            lines += [f"![{seg['file']}]({seg['file']})", ""]
    lines.append(f"*{record['model']}, seed {record['seed']}*")
    return "\n".join(lines) + "\n"


def story_html(record: dict, title: str, images: dict[str, Image.Image]) -> str:
    """A self-contained page (pictures inline as data URIs), readable on a phone."""
    import base64
    import html
    import io

    parts = []
    for seg in record["segments"]:
        if seg["type"] == "text":
            parts.append(f'<p class="text">{html.escape(seg["text"])}</p>')
        else:
            buf = io.BytesIO()
            images[seg["file"]].save(buf, format="PNG")
            data = base64.b64encode(buf.getvalue()).decode("ascii")
            alt = html.escape(seg["file"])
            parts.append(f'<img class="picture" alt="{alt}" src="data:image/png;base64,{data}">')
    body = "\n".join(parts)
    caption = html.escape(f"{record['model']}, seed {record['seed']}")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>
  body {{ margin: 0 auto; max-width: 32rem; padding: 1rem; font: 1.1rem/1.5 system-ui, sans-serif;
         background: #fafafa; color: #222; }}
  h1 {{ font-size: 1.3rem; }}
  .picture {{ display: block; width: 100%; max-width: 24rem; margin: 0.5rem auto 1.5rem;
              image-rendering: pixelated; border-radius: 6px; }}
  footer {{ color: #777; font-size: 0.9rem; }}
</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<main>
{body}
</main>
<footer>{caption}</footer>
</body>
</html>
"""


def save_story(
    story, folder: Path, *, overwrite: bool = False, files: list[str] | None = None
) -> dict:
    """Write a story's pictures (``picture-NN.png``, unless ``files`` says they are there
    already), ``story.json``, ``story.md`` and ``story.html`` into ``folder``; every file
    through a temporary name. Returns the JSON record."""
    folder = Path(folder)
    pictures = [s for s in story.segments if not isinstance(s, str)]
    # every file is checked before any is written: no half-replaced folder
    names = [*(picture_name(i) for i in range(1, len(pictures) + 1) if files is None), *STORY_FILES]
    for name in names:
        check_writable(folder / name, overwrite=overwrite)
    if files is None:
        files = []
        for i, image in enumerate(pictures, start=1):
            save_png(image, folder / picture_name(i), overwrite=overwrite)
            files.append(picture_name(i))
    record = story_record(story, files)
    title = next((s for s in story.segments if isinstance(s, str)), "a story")
    write_text_atomic(folder / "story.json", json.dumps(record, indent=2) + "\n")
    write_text_atomic(folder / "story.md", story_markdown(record, title))
    write_text_atomic(
        folder / "story.html", story_html(record, title, dict(zip(files, pictures, strict=True)))
    )
    if overwrite:  # the story replaced has no pictures left over (removed once this is whole)
        for old in folder.glob("picture-*.png"):
            if old.name not in files:
                old.unlink(missing_ok=True)
    return record
