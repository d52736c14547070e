"""Training: one accelerate-driven loop (`train`) and recipes loaded by path.

A recipe is a Python file with ``main(argv: list[str]) -> None`` that builds a model, a
dataset and a `TrainConfig` and calls `train`; ``anygen train RECIPE.py [args...]`` runs
it through `run_recipe`. Losses live with their models, not here.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from anygen.errors import UserInputError
from anygen.training.checkpoint import latest_checkpoint, list_checkpoints
from anygen.training.loop import (
    StepInfo,
    TrainConfig,
    TrainingDivergedError,
    TrainResult,
    read_metrics,
    train,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

__all__ = [
    "StepInfo",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "caption_forms_arg",
    "device_description",
    "end_distributed",
    "known_words",
    "part_reference",
    "seconds_per_step",
    "training_device",
    "training_seconds",
    "latest_checkpoint",
    "lineage",
    "lineage_text",
    "read_metrics",
    "list_checkpoints",
    "load_recipe",
    "run_recipe",
    "train",
    "start_from",
    "starting_lineage",
    "warn_if_same_seed",
    "warn_if_unscored_bundle",
]


def known_words(tokenizer: str) -> list[str]:
    """The words of a shapes-world tokenizer's ``words.txt`` (what the CLI warns about when
    a prompt leaves them), sorted; none for a tokenizer without that file (a hub one)."""
    from anygen.hub import resolve

    words = resolve(tokenizer, kind="tokenizer") / "words.txt"
    return sorted(words.read_text(encoding="utf-8").split()) if words.is_file() else []


def part_reference(name_or_path: str) -> str | None:
    """How a saved model names a part it was trained with: a bundled name or hub id is
    referenced; a local folder gives None, so that the part is copied in (a path would
    resolve against the model's folder, or tie the model to this working directory)."""
    return None if Path(name_or_path).expanduser().exists() else name_or_path


def device_description() -> str:
    """What a model card says it was trained on: the GPU's name, or the CPU and threads."""
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    threads = torch.get_num_threads()
    return f"{platform.processor() or platform.machine()} ({threads} thread{'s' * (threads != 1)})"


def training_device(*metrics: str | os.PathLike) -> str:
    """The device a run trained on, from the rows of its ``metrics.jsonl`` files (each names
    its device): several, in the order first used, joined by " then " when a resumed run
    moved. ``device_description()`` of this process for runs whose rows name none."""
    devices = [row["device"] for path in metrics for row in read_metrics(path) if "device" in row]
    return " then ".join(dict.fromkeys(devices)) or device_description()


def caption_forms_arg(text: str) -> dict[str, float]:
    """A recipe's ``--caption-forms`` value: ``"position=3,count=0.5"`` ->
    ``{"position": 3.0, "count": 0.5}``, checked against the shapes world's caption forms
    (an ``argparse`` type: a bad value is a one-line usage error)."""
    import argparse

    from anygen.data.shapes import caption_form_weights

    weights = {}
    for item in text.split(","):
        form, sep, value = item.partition("=")
        try:
            weights[form.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise argparse.ArgumentTypeError(f"expected FORM=WEIGHT, got {item!r}")
    try:
        caption_form_weights(weights)
    except UserInputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return weights


def start_from(model: torch.nn.Module, name: str, mismatches: Sequence[str]) -> torch.nn.Module:
    """``model``, loaded from saved model ``name`` for ``--init-from``, in training mode; a
    UserInputError naming every mismatch with the recipe's tokenizers if there are any."""
    if mismatches:
        raise UserInputError(f"--init-from {name} does not fit: " + "; ".join(mismatches))
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    log.info("starting from %s (%.2f M parameters)", name, millions)
    return model.train()


# What a continuation records of the model it started from (and that model of its own start).
LINEAGE_KEYS = (
    "recipe", "argv", "seed", "steps", "denoiser_steps", "train_time_s", "device", "started_from"
)  # fmt: skip


def lineage(init_dir: str | os.PathLike) -> dict | None:
    """How the saved model in ``init_dir`` was trained, from its ``training.json``: recipe,
    argv, seed, steps, training seconds, device and, under ``started_from``, the same of
    the model it was continued from in turn. A continuation records this as its own
    ``started_from``, so its card still says where its weights came from after it replaces
    that model under the same name. None for a model without a readable record."""
    try:
        record = json.loads((Path(init_dir) / "training.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    return {k: record[k] for k in LINEAGE_KEYS if k in record}


def lineage_runs(record: dict | None) -> list[dict]:
    """The runs of a lineage record, the latest first (each without its ``started_from``)."""
    runs = []
    while isinstance(record, dict):
        runs.append({k: v for k, v in record.items() if k != "started_from"})
        record = record.get("started_from")
    return runs


def lineage_text(record: dict | None) -> str:
    """One clause for a model card: the runs before this one, the latest first."""

    def seconds(run: dict) -> float:  # the ldm recipe records its stages apart
        time = run.get("train_time_s", 0)
        return sum(time.values()) if isinstance(time, dict) else time

    parts = [
        f"{r.get('steps', r.get('denoiser_steps', '?'))} steps with seed {r.get('seed', '?')} "
        f"({seconds(r):.0f} s on {r.get('device', 'an unrecorded device')})"
        for r in lineage_runs(record)
    ]
    if not parts:
        return "its training was not recorded"
    return "trained before by " + ", after ".join(parts)


def starting_lineage(
    init_dir: str | os.PathLike, run_model_dir: str | os.PathLike, resume: bool
) -> dict | None:
    """The lineage a continuation from ``init_dir`` records. A resumed run keeps what its
    first invocation read, the ``started_from`` in the model it saved in ``run_model_dir``:
    by then ``--bundle`` may have replaced the model ``init_dir`` names with this run's own
    weights, whose record would make the run its own ancestor."""
    if resume:
        try:
            saved = json.loads((Path(run_model_dir) / "training.json").read_text())
        except (OSError, ValueError):
            saved = None
        if isinstance(saved, dict) and isinstance(saved.get("started_from"), dict):
            return saved["started_from"]
    return lineage(init_dir)


def warn_if_same_seed(init_dir: str | os.PathLike, seed: int, record: dict | None = None) -> bool:
    """Warn when a run continued from the saved model in ``init_dir`` uses a seed that
    model's training, or a run before it (its ``training.json`` lineage, or ``record`` when
    given), used: the recipes draw their training samples from the seed, so the
    continuation would see the same samples again. Returns whether it warned; a model
    without that record is not checked."""
    runs = lineage_runs(record if record is not None else lineage(init_dir))
    if seed not in [r.get("seed") for r in runs]:
        return False
    log.warning(
        "%s was trained with seed %s, the seed of this run: it will draw the same training"
        " samples again (give --seed another value for new ones)",
        init_dir,
        seed,
    )
    return True


def warn_if_unscored_bundle(bundle: bool, eval_n: int, destination: str | os.PathLike) -> bool:
    """Warn, before any training, when ``--bundle`` is asked for with ``--eval-n 0``: the
    bundled model would replace ``destination`` with a card that has no shapes-eval
    tables and a ``training.json`` without scores. Returns whether it warned."""
    if not bundle or eval_n:
        return False
    log.warning(
        "--bundle with --eval-n 0: %s will be replaced by a model whose card has no"
        " shapes-eval scores (drop --eval-n 0 to score the bundled weights)",
        destination,
    )
    return True


def training_seconds(metrics: str | os.PathLike, gap: float = 300.0) -> float:
    """Time spent training, from a run's ``metrics.jsonl``: the sum of the intervals between
    its rows, leaving out gaps longer than ``gap`` seconds (a run stopped and resumed
    later), so a resumed run reports its training time, not the last invocation's."""
    return float(sum(seconds for seconds, _ in _timed_intervals(metrics, gap)))


def seconds_per_step(metrics: str | os.PathLike, gap: float = 300.0) -> float:
    """Mean seconds per optimizer step over the intervals ``training_seconds`` counts
    (0.0 when ``metrics.jsonl`` holds fewer than two rows)."""
    intervals = _timed_intervals(metrics, gap)
    steps = sum(step for _, step in intervals)
    return float(sum(seconds for seconds, _ in intervals) / steps) if steps else 0.0


def _timed_intervals(metrics: str | os.PathLike, gap: float) -> list[tuple[float, int]]:
    """(seconds, steps) between consecutive rows of ``metrics.jsonl``, gaps left out."""
    rows = read_metrics(metrics)
    return [
        (b["time"] - a["time"], b["step"] - a["step"])
        for a, b in zip(rows, rows[1:], strict=False)
        if 0 < b["time"] - a["time"] < gap
    ]


def load_recipe(path: str | os.PathLike) -> ModuleType:
    """Import the recipe file at `path` as a module; it must define a callable `main`."""
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"recipe file not found: {path}")
    if not path.is_file() or path.suffix != ".py":
        raise UserInputError(f"a recipe is a Python file ending in .py, got {path}")
    module_name = "anygen_recipe_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserInputError(f"cannot load recipe {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before running so that dataclasses and pickling inside the recipe resolve it.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    main = getattr(module, "main", None)
    if not callable(main):
        sys.modules.pop(module_name, None)
        raise UserInputError(
            f"recipe {path} has no main(argv) function; a recipe defines "
            "`def main(argv: list[str]) -> None`"
        )
    return module


def run_recipe(path: str | os.PathLike, argv: Sequence[str] = ()) -> None:
    """Load the recipe at `path` and call its ``main(list(argv))``.

    Under ``accelerate launch`` the process group is destroyed when the recipe ends (see
    `end_distributed`).
    """
    try:
        load_recipe(path).main(list(argv))
    finally:
        end_distributed()


def end_distributed() -> None:
    """Destroy the default process group, if one is up, while the interpreter is whole.

    Left to interpreter teardown, gloo's worker threads can still hold work that refers to
    Python objects, and the process then aborts ("terminate called without an active
    exception", SIGABRT) after its run has finished and saved everything: rarely, but
    enough to fail a launch. A no-op in a single process.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
