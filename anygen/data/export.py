"""Write shapes-world samples to a directory: PNG images and ``metadata.jsonl``.

Layout (``i`` is the sample index, zero-padded to 6 digits):
- t2i:     ``{i}.png``
- story:   ``{i}_{k}.png`` for scene k = 0..N-1
- edit:    ``{i}_source.png``, ``{i}_target.png``
- subject: ``{i}_ref{k}.png`` for reference k, ``{i}_target.png`` (the prompt's scene)
- vqa:     ``{i}.png``

``metadata.jsonl`` holds one JSON object per sample, in index order: ``index``, ``task``,
``split``, ``seed``, ``size``, ``files`` (names relative to the directory, in the order
above) and the sample's own fields (``T2ISample.to_dict()``, ``Story.to_dict()``, ...:
scenes via ``Scene.to_dict``, captions, texts, events, question and answer).

Every file is written under a temporary name (``.tmp-<name>``) and renamed when complete, and
``metadata.jsonl`` is renamed last, so a directory with ``metadata.jsonl`` is a finished
export.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from anygen.data.render import check_size, render_image
from anygen.data.shapes import (
    TASKS,
    Edit,
    Story,
    SubjectSample,
    T2ISample,
    VQASample,
    check_split,
    task_sample,
)
from anygen.data.world import Scene
from anygen.errors import UserInputError

logger = logging.getLogger(__name__)

METADATA = "metadata.jsonl"


def _images(
    index: int, sample: T2ISample | Story | Edit | SubjectSample | VQASample
) -> list[tuple[str, Scene]]:
    """(file name, scene) for each image of a sample."""
    stem = f"{index:06d}"
    if isinstance(sample, (T2ISample, VQASample)):
        return [(f"{stem}.png", sample.scene)]
    if isinstance(sample, Story):
        return [(f"{stem}_{k}.png", scene) for k, scene in enumerate(sample.scenes)]
    if isinstance(sample, Edit):
        return [(f"{stem}_source.png", sample.source), (f"{stem}_target.png", sample.target)]
    if isinstance(sample, SubjectSample):
        refs = [(f"{stem}_ref{k}.png", scene) for k, scene in enumerate(sample.references)]
        return [*refs, (f"{stem}_target.png", sample.scene)]
    raise TypeError(f"no image layout for {type(sample).__name__}")


def _prepare_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise UserInputError(f"output path {output_dir} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise UserInputError(
            f"output directory {output_dir} is not empty; choose an empty one or pass "
            "--overwrite (overwrite=True)"
        )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserInputError(f"cannot create {output_dir}: {e.strerror}") from None
    # an export is finished when metadata.jsonl is there: an older one goes first, so that
    # an interrupted overwrite never passes for finished with images of another export
    (output_dir / METADATA).unlink(missing_ok=True)


def write_shapes(
    task: str,
    n: int,
    seed: int,
    output_dir: str | os.PathLike,
    size: int = 64,
    split: str = "test",
    *,
    overwrite: bool = False,
    require_held_out: bool = False,
) -> Path:
    """Write ``n`` samples of ``task`` (t2i, story, edit, subject, vqa) under ``seed`` to
    ``output_dir`` as PNGs of side ``size`` plus ``metadata.jsonl``; returns the directory.

    Sample i equals ``task_sample(task, seed, i, split)`` (and item i of the matching
    dataset). Refuses a non-empty directory unless ``overwrite`` (files of the same names
    are replaced; other files are left). ``require_held_out`` (test only): every sample
    holds a held-out pair (or held-out subject).
    """
    if task not in TASKS:
        raise UserInputError(f"unknown shapes task {task!r}; expected one of {tuple(TASKS)}")
    if n < 1:
        raise UserInputError(f"number of samples must be >= 1, got {n}")
    check_size(size)
    check_split(split)
    options = {"require_held_out": True} if require_held_out else {}
    task_sample(task, seed, 0, split, **options)  # validate the options before touching the disk
    output_dir = Path(output_dir)
    _prepare_dir(output_dir, overwrite)

    tmp_meta = output_dir / f".tmp-{METADATA}"
    try:
        _write_samples(task, n, seed, split, size, options, output_dir, tmp_meta)
    except BaseException:  # no temporary files left behind
        for tmp in output_dir.glob(".tmp-*"):
            tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp_meta, output_dir / METADATA)
    logger.info("wrote %d %s samples (%s split, %d px) to %s", n, task, split, size, output_dir)
    return output_dir


def _write_samples(task, n, seed, split, size, options, output_dir: Path, tmp_meta: Path) -> None:
    with open(tmp_meta, "w", encoding="utf-8") as meta:
        for i in range(n):
            sample = task_sample(task, seed, i, split, **options)
            files = []
            for name, scene in _images(i, sample):
                tmp = output_dir / f".tmp-{name}"
                render_image(scene, size).save(tmp, format="PNG")
                os.replace(tmp, output_dir / name)
                files.append(name)
            record = {
                "index": i,
                "task": task,
                "split": split,
                "seed": seed,
                "size": size,
                "files": files,
            }
            record.update(sample.to_dict())
            meta.write(json.dumps(record) + "\n")


def read_metadata(output_dir: str | os.PathLike) -> list[dict]:
    """The records of an export's ``metadata.jsonl``, in index order."""
    path = Path(output_dir) / METADATA
    if not path.is_file():
        raise UserInputError(f"{path} not found: not a finished shapes export")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


__all__ = ["METADATA", "read_metadata", "write_shapes"]
