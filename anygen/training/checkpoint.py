"""Training checkpoints that are either complete or absent.

A checkpoint is what ``accelerator.save_state`` writes (model, optimizer, LR scheduler,
RNG states of every process, registered objects such as the EMA), written into

    OUTPUT_DIR/checkpoints/.tmp-step-00001000/

then completed by a marker file written last (``checkpoint-complete.json``, fsynced
after every other file) and renamed atomically to

    OUTPUT_DIR/checkpoints/step-00001000/

A reader trusts only ``step-XXXXXXXX`` directories that hold the marker; anything else
(a leftover ``.tmp-step-*`` from a process killed mid-write, a step directory without its
marker) is incomplete, ignored on resume and removed by ``remove_incomplete``.

One filesystem shared by all processes is assumed (one machine, or a shared disk for
multi-node runs): the main process creates, completes and renames the directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anygen.errors import CheckpointError
from anygen.hub import default_file_modes, fsync_dir, fsync_file

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

CHECKPOINTS_DIRNAME = "checkpoints"
COMPLETE_MARKER = "checkpoint-complete.json"
MARKER_FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_TMP_PREFIX = ".tmp-step-"
_OLD_PREFIX = ".old-step-"


def checkpoint_dirname(step: int) -> str:
    """``step-00001000`` for step 1000."""
    if step < 0 or step > 99_999_999:
        raise CheckpointError(f"checkpoint step {step} is outside 0..99999999")
    return f"step-{step:08d}"


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIRNAME


def read_marker(path: str | os.PathLike) -> dict[str, Any]:
    """The completion marker of checkpoint directory `path`; CheckpointError if it is not complete."""
    path = Path(path)
    marker = path / COMPLETE_MARKER
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    if not marker.is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete: it has no {COMPLETE_MARKER} "
            "(the run was probably stopped while writing it)"
        )
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"checkpoint {path}: cannot read {COMPLETE_MARKER}: {error}"
        ) from error
    if not isinstance(info, dict) or not isinstance(info.get("step"), int):
        raise CheckpointError(f"checkpoint {path}: {COMPLETE_MARKER} has no integer 'step'")
    return info


def is_complete(path: str | os.PathLike) -> bool:
    try:
        read_marker(path)
    except CheckpointError:
        return False
    return True


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under OUTPUT_DIR/checkpoints as (step, path), oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match is None or not entry.is_dir():
            continue
        if not is_complete(entry):
            logger.warning("ignoring incomplete checkpoint %s (no %s)", entry, COMPLETE_MARKER)
            continue
        found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step, or None when there is none."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def incomplete_entries(output_dir: str | os.PathLike) -> list[Path]:
    """Leftovers of interrupted writes: temp dirs, step dirs without a marker, replaced dirs."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    leftovers = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
            leftovers.append(entry)
        elif _STEP_DIR.match(entry.name) and not is_complete(entry):
            leftovers.append(entry)
    return leftovers


def remove_incomplete(output_dir: str | os.PathLike) -> list[Path]:
    """Delete what `incomplete_entries` finds; call on the main process only."""
    leftovers = incomplete_entries(output_dir)
    for entry in leftovers:
        logger.warning("removing incomplete checkpoint %s", entry)
        _remove(entry)
    return leftovers


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int | None) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints (None keeps all)."""
    if keep_last is None:
        return []
    if keep_last < 1:
        raise CheckpointError(f"keep_last must be >= 1 or None, got {keep_last}")
    doomed = [path for _, path in list_checkpoints(output_dir)[:-keep_last]]
    for path in doomed:
        logger.info("removing old checkpoint %s (keeping the last %d)", path, keep_last)
        _remove(path)
    return doomed


EMA_WEIGHTS = "ema.safetensors"


def save_ema(ema: Any, directory: Path) -> None:
    """EMA shadow parameters and counters as safetensors (never pickle)."""
    from safetensors.torch import save_file

    tensors = {
        f"shadow.{i}": p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)
    }
    meta = {"optimization_step": str(ema.optimization_step), "decay": str(ema.decay)}
    save_file(tensors, str(directory / EMA_WEIGHTS), metadata=meta)


def load_ema(ema: Any, directory: Path) -> None:
    from safetensors import safe_open

    path = directory / EMA_WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        n = len(list(f.keys()))
        if n != len(ema.shadow_params):
            raise CheckpointError(
                f"{path} holds {n} EMA tensors but the model has {len(ema.shadow_params)}"
            )
        for i, p in enumerate(ema.shadow_params):
            p.data.copy_(f.get_tensor(f"shadow.{i}"))
    ema.optimization_step = int(meta["optimization_step"])


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    step: int,
    info: dict[str, Any],
    ema: Any = None,
) -> Path:
    """Write a complete checkpoint for `step`; every process must call this.

    `info` goes into the completion marker beside the step (run settings that a resume
    compares against). Returns the final ``step-XXXXXXXX`` path.
    """
    root = checkpoints_dir(output_dir)
    name = checkpoint_dirname(step)
    tmp = root / f"{_TMP_PREFIX}{step:08d}"
    final = root / name
    if accelerator.is_main_process:
        if tmp.exists():
            _remove(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            save_ema(ema, tmp)
        default_file_modes(tmp)
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                fsync_file(path)
        marker = {"format": MARKER_FORMAT, "step": step, "saved_at": time.time(), **info}
        _write_durably(tmp / COMPLETE_MARKER, json.dumps(marker, indent=2, sort_keys=True) + "\n")
        if final.exists():
            # Resuming from an older checkpoint re-reaches this step: the new one replaces it.
            old = root / f"{_OLD_PREFIX}{step:08d}"
            logger.warning("replacing existing checkpoint %s", final)
            if old.exists():
                _remove(old)
            os.rename(final, old)
            os.rename(tmp, final)
            _remove(old)
        else:
            os.rename(tmp, final)
        fsync_dir(root)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
