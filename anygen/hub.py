"""Model resolution and checkpoints.

A model is named in one of three ways, tried in this order:
- a local file or directory (a saved checkpoint, a diffusers pipeline folder),
- a bundled name: a folder shipped inside the installed package, under
  ``anygen/assets/models/<name>/`` (models) or the repository's top-level
  ``tokenizers/<name>/`` (tokenizers; packaged as ``anygen._tokenizers``),
- a catalogue name (``anygen.catalog.REAL_MODELS``, e.g. ``sdxl``), which stands for its
  hub id,
- a Hugging Face hub id ``org/name``, fetched through huggingface_hub's cache
  (``HF_HUB_CACHE``), which honours ``HF_HUB_OFFLINE``: only configs, tokenizer files and
  safetensors are fetched.

anygen's own checkpoints are a directory with ``config.json`` and
``model.safetensors``, written to a temporary directory beside the target and renamed
into place only when complete. Pickle files (``.bin .pt .pth .ckpt``) are refused
unless asked for, and then read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import re
import shutil
import types
import typing
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from anygen import __version__
from anygen.errors import CheckpointError, ModelNotFoundError

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CARD_NAME = "README.md"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
KINDS = ("model", "tokenizer")
# What a tokenizer needs from a hub repo; its weights are never downloaded for it.
TOKENIZER_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken"]

_ASSETS = Path(__file__).resolve().parent / "assets"


# -----------------------------------------------------------------------------
# bundled models and resolution


def _tokenizers_root() -> Path | None:
    """The folder of bundled tokenizers: the package data ``anygen._tokenizers`` of a
    regular install, else the checkout's ``tokenizers/`` (a source tree, or an editable
    install: setuptools' editable finder does not map a subpackage without __init__.py)."""
    spec = importlib.util.find_spec("anygen._tokenizers")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    checkout = Path(__file__).resolve().parents[1]
    folder = checkout / "tokenizers"
    # guard: next to an installed anygen, "tokenizers" is HuggingFace's library
    if (checkout / "pyproject.toml").is_file() and not (folder / "__init__.py").exists():
        return folder
    return None


def card_metadata(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The metadata block (YAML front matter) of a model's ``README.md`` card; {} without one."""
    card = resolve(name_or_path) / CARD_NAME
    if not card.is_file():
        return {}
    from huggingface_hub.repocard import metadata_load

    return metadata_load(card) or {}


def set_front_matter(card: str, key: str, text: str) -> str:
    """``card`` (a README.md's text) with its front-matter line ``key: text`` replaced, or
    added (with the front matter itself when the card has none)."""
    line = f"{key}: {text}"
    match = re.match(r"---\n(.*?\n)---\n", card, re.S)
    if match is None:
        return f"---\n{line}\n---\n{card}"
    front = [ln for ln in match.group(1).splitlines() if not ln.startswith(f"{key}:")]
    return "---\n" + "\n".join([*front, line]) + "\n---\n" + card[match.end() :]


def write_card_section(card: str, key: str, value: Any, section: str) -> str:
    """``card`` with front matter ``key`` set to ``value`` (one JSON line) and the section
    between ``<!-- anygen:key -->`` markers replaced by ``section`` (appended when the card
    has none), so that re-running what wrote it replaces it."""
    return put_card_block(set_front_matter(card, key, json.dumps(value)), key, section)


def put_card_block(card: str, key: str, text: str) -> str:
    """``card`` with the block between its ``<!-- anygen:key -->`` markers replaced by
    ``text``, or the block appended where the card has none."""
    begin, end = f"<!-- anygen:{key} -->", f"<!-- /anygen:{key} -->"
    block = f"{begin}\n{text}\n{end}"
    if card_block(card, key) is not None:
        start = card.index(begin)
        stop = card.index(end, start)
        return card[:start] + block + card[stop + len(end) :]
    return card.rstrip("\n") + "\n\n" + block + "\n"


HISTORY = "history"
"""The card block (``<!-- anygen:history -->`` ... ``<!-- /anygen:history -->``) that people
write by hand: how a bundled model came to be, the models it replaced; ``keep_history``
carries it into the card of the model that replaces it."""


def card_block(card: str, key: str) -> str | None:
    """The text between ``card``'s ``<!-- anygen:key -->`` markers, or None without them."""
    begin, end = f"<!-- anygen:{key} -->", f"<!-- /anygen:{key} -->"
    start = card.find(begin)
    stop = card.find(end, start + len(begin)) if start >= 0 else -1
    if stop < 0:
        return None
    return card[start + len(begin) : stop].strip("\n")


def keep_history(card: str, folder: str | os.PathLike) -> str:
    """``card`` (the new card of the model about to be written to ``folder``) with the
    history block of the card already in ``folder``, so that re-bundling a model keeps
    what was written by hand about it: in place of ``card``'s own block, else appended.
    ``card`` unchanged where ``folder`` has no card or its card no history."""
    return with_history(card, history_of(folder))


def history_of(folder: str | os.PathLike) -> str | None:
    """The history block of the card in ``folder``; None without a card or a block."""
    old = Path(folder) / CARD_NAME
    return card_block(old.read_text(encoding="utf-8"), HISTORY) if old.is_file() else None


def with_history(card: str, history: str | None) -> str:
    """``card`` with ``history`` as its history block (``card`` itself for None)."""
    return card if history is None else put_card_block(card, HISTORY, history)


def bundled_models(kind: str | None = None) -> dict[str, Path]:
    """The bundled models and tokenizers (``kind`` "model" or "tokenizer"), name -> folder."""
    _check_kind(kind)
    roots = {"model": _ASSETS / "models", "tokenizer": _tokenizers_root()}
    found: dict[str, Path] = {}
    for root_kind, root in roots.items():
        if (kind is not None and root_kind != kind) or root is None or not root.is_dir():
            continue
        for folder in sorted(root.iterdir()):
            if not folder.is_dir() or folder.name.startswith((".", "_")):
                continue
            if folder.name in found:
                raise RuntimeError(
                    f"bundled name {folder.name!r} is used twice ({found[folder.name]} and "
                    f"{folder}): rename one of them"
                )
            found[folder.name] = folder
    return found


def _check_kind(kind: str | None) -> None:
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith((".", "/", "~"))
        or text.count("/") > 1
        or "\\" in text
        or text.endswith((".safetensors", ".json", *PICKLE_SUFFIXES))
    )


def _is_hub_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def resolve(name_or_path: str | os.PathLike, kind: str | None = None) -> Path:
    """The local path of a model or tokenizer given as a path, a bundled name or a hub id.

    ``kind`` ("model" or "tokenizer") restricts bundled names to that kind and, for
    hub ids, downloads only a tokenizer's files. Raises ``ModelNotFoundError``.
    """
    _check_kind(kind)
    text = os.fspath(name_or_path)
    if not text.strip():
        raise ModelNotFoundError("empty model name: give a bundled name, a path or a hub id")
    path = Path(text).expanduser()
    if path.exists():
        logger.debug("resolved %s to the local path %s", text, path)
        return path.resolve()
    bundled = bundled_models(kind)
    if text in bundled:
        return bundled[text]
    if kind != "tokenizer":
        from anygen.catalog import REAL_MODELS

        if text in REAL_MODELS:
            return _download(REAL_MODELS[text].hub_id, kind, friendly=text)
    if _looks_like_path(text):
        raise ModelNotFoundError(f"no such file or directory: {text}")
    if _is_hub_id(text):
        return _download(text, kind)
    what = f"bundled {kind}s" if kind else "bundled models"
    friendly = "" if kind == "tokenizer" else ", not a catalogue name (see `anygen models`)"
    raise ModelNotFoundError(
        f"unknown model {text!r}: not a local path, not one of the {what} "
        f"({', '.join(bundled) or 'none installed'}){friendly}, and not a hub id (org/name)"
    )


def resolve_add_on(source: str | os.PathLike, what: str) -> Path:
    """The local path of weights added on top of a model (``what``: "LoRA", "embedding"),
    given as a file, a folder or a hub id. Bundled and catalogue names are models, not
    add-ons, so they are not looked up. Raises ``ModelNotFoundError``."""
    text = os.fspath(source)
    if not text.strip():
        raise ModelNotFoundError(
            f"empty {what} name: give a .safetensors file, a folder or a hub id"
        )
    path = Path(text).expanduser()
    if path.exists():
        return path.resolve()
    if not _looks_like_path(text) and _is_hub_id(text):
        return _download(text, None)
    raise ModelNotFoundError(
        f"no such {what} file or folder: {text} (give a .safetensors file, a folder holding "
        "one, or a hub id org/name)"
    )


# What a model needs from a hub repo: configs, tokenizer files and safetensors weights.
# Pickle weights are never fetched (they are refused anyway), nor half-precision variants
# (``*.fp16.safetensors``: anygen loads the default files and casts).
MODEL_IGNORE_PATTERNS = [
    *(f"*{suffix}" for suffix in PICKLE_SUFFIXES),
    "*.msgpack",
    "*.h5",
    "*.onnx",
    "*.onnx_data",
    "*.gguf",
    "*.fp16.*",
    "*non_ema*",
    "*.ema.*",
]


def _download_tqdm():
    """The tqdm class that downloads report through: tqdm's own where
    ``ANYGEN_DOWNLOAD_BARS`` is set (the CLI sets it when it switches the hub's bars off to
    hide the libraries' loading bars, which transformers ties to that switch), else None
    (huggingface_hub's bars, on or off as the user set them)."""
    if not os.environ.get("ANYGEN_DOWNLOAD_BARS"):
        return None
    from tqdm.auto import tqdm

    class DownloadBar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("disable", None)  # off where output is not a terminal
            super().__init__(*args, **kwargs)

    return DownloadBar


def _download(repo_id: str, kind: str | None, friendly: str | None = None) -> Path:
    """The local snapshot of ``repo_id`` in the Hugging Face cache (``HF_HUB_CACHE``),
    fetched unless ``HF_HUB_OFFLINE`` is set; every failure is one line naming the model
    and what to do."""
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    # read at call time, so that a changed environment (tests, notebooks) is honoured
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    with _hub_errors(repo_id, friendly):
        if constants.is_offline_mode():  # the cached snapshot, whatever files it holds
            return Path(snapshot_download(repo_id, cache_dir=cache_dir))
        if kind == "tokenizer":
            allow, ignore = TOKENIZER_PATTERNS, None
        else:
            # A diffusers pipeline keeps its components in subfolders; a repo's top-level
            # weights are then single-file checkpoints (several GB) that anygen never reads.
            try:
                hf_hub_download(repo_id, "model_index.json", cache_dir=cache_dir)
                allow = ["model_index.json", "*.md", "*/*"]
            except EntryNotFoundError:
                allow = None
            ignore = MODEL_IGNORE_PATTERNS
        logger.info("fetching %s from the Hugging Face hub into its cache", repo_id)
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=allow,
                ignore_patterns=ignore,
                cache_dir=cache_dir,
                tqdm_class=_download_tqdm(),
            )
        )


def download_file(repo_id: str, filename: str) -> Path:
    """One file of a hub repo (``org/name`` and a path in it) in the Hugging Face cache,
    fetched unless ``HF_HUB_OFFLINE`` is set; failures as ``resolve``'s."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    with _hub_errors(repo_id):
        try:
            logger.info("fetching %s from %s on the Hugging Face hub", filename, repo_id)
            return Path(
                hf_hub_download(repo_id, filename, cache_dir=cache_dir, tqdm_class=_download_tqdm())
            )
        except EntryNotFoundError as e:
            if isinstance(e, LocalEntryNotFoundError):  # not cached, hub unreachable
                raise
            raise ModelNotFoundError(
                f"{repo_id} on the Hugging Face hub has no {filename}"
            ) from None


@contextmanager
def _hub_errors(repo_id: str, friendly: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub's failures into one-line ``ModelNotFoundError``s that name the
    model and what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = f"{friendly} ({repo_id})" if friendly else repo_id
    try:
        yield
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        if constants.is_offline_mode():
            raise ModelNotFoundError(
                f"{name} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
                f"download it with `hf download {repo_id}` on a connected machine, "
                "or unset HF_HUB_OFFLINE"
            ) from None
        raise ModelNotFoundError(
            f"{name} is not in the Hugging Face cache and the hub cannot be reached: "
            f"connect to the network, or copy the cache from a machine that ran "
            f"`hf download {repo_id}`"
        ) from None
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{name} is gated: accept its licence on https://huggingface.co/{repo_id}, "
            "then `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{name} was not found on the Hugging Face hub (a private repo needs `hf auth login`)"
        ) from None
    except RevisionNotFoundError as e:
        raise ModelNotFoundError(f"{name}: revision not found ({e})") from None
    except HfHubHTTPError as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelNotFoundError(f"could not download {name}: {first_line}") from None


# -----------------------------------------------------------------------------
# writing checkpoints


def fsync_file(path: Path) -> None:
    """Flush a written file to disk, so that a rename after it never exposes a partial one."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            fsync_file(file)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_modes(path: Path) -> None:
    """Give ``path`` (a file, or every file under a folder) the mode a plain ``open``
    would have: ``0o666`` less the umask.

    safetensors >= 0.8 writes through a temporary file created ``0o600`` and renamed
    (safetensors#782), so weights saved by it, or by diffusers and transformers over it,
    would be readable by their owner alone while the config beside them is not.
    """
    mode = 0o666 & ~_umask()
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    for file in files:
        if file.stat().st_mode & 0o777 != mode:
            os.chmod(file, mode)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; not possible on every platform (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(
    target: str | os.PathLike, *, marker: str | None = CONFIG_NAME, keep_other_files: bool = True
) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it replaces ``target``.

    On an exception the temporary directory is removed and ``target`` is left as it was.
    An existing ``target`` is replaced only if it is empty or holds ``marker`` (so that a
    directory of other files is never deleted by mistake); ``marker=None`` replaces any.
    Files of the old ``target`` that are not checkpoint parts (the user's notes, sample
    images) are kept, as ``save_pretrained`` in transformers keeps them; its configs,
    weights, model card and component subfolders go, since a stale shard, pickle, config
    or card beside the new checkpoint would be read as part of it. ``keep_other_files=False``
    (a cache the writer owns whole) replaces everything.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"cannot write a checkpoint to {target}: it is a file")
    if (
        marker is not None
        and target.is_dir()
        and any(target.iterdir())
        and not (target / marker).exists()
    ):
        raise CheckpointError(
            f"refusing to replace {target}: it is not empty and has no {marker}, "
            "so it does not look like a checkpoint; choose another directory"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        default_file_modes(tmp)
        fsync_tree(tmp)
        if keep_other_files and target.exists():
            _keep_other_files(target, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".tmp-{target.name}-old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _is_checkpoint_file(name: str) -> bool:
    """A config, weights, a shard index, a pickled training state (accelerate's ``*.pkl``)
    or the model card (whose front matter is read as the model's scores)."""
    return name == CARD_NAME or name.endswith((".json", ".safetensors", ".pkl", *PICKLE_SUFFIXES))


def _keep_other_files(old: Path, new: Path) -> None:
    """Link (or copy) into ``new`` the files of ``old`` that are not checkpoint parts.

    Checkpoint parts are configs and weights, and every subfolder holding one (``unet/``,
    ``tokenizer/``): those the new checkpoint writes afresh or leaves out on purpose. What
    is left is the user's: notes, sample images, folders of their own.
    """
    parts = {
        file.parent.relative_to(old).parts[:1]
        for file in old.rglob("*")
        if file.is_file() and _is_checkpoint_file(file.name)
    }
    kept = []
    for file in sorted(old.rglob("*")):
        relative = file.relative_to(old)
        if (
            not file.is_file()
            or file.is_symlink()
            or _is_checkpoint_file(file.name)
            or relative.parts[0].startswith(".tmp-")
            or (len(relative.parts) > 1 and relative.parts[:1] in parts)
        ):
            continue
        destination = new / relative
        if destination.exists() or any(
            parent.exists() and not parent.is_dir() for parent in destination.parents
        ):
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, destination)
        except OSError:
            shutil.copy2(file, destination)
        fsync_file(destination)
        kept.append(str(relative))
    if kept:
        logger.info("kept %d file(s) of the checkpoint in %s: %s", len(kept), old, ", ".join(kept))


def read_json_object(file: Path) -> dict:
    """A checkpoint's JSON file (a config, a model index, anygen.json) as a dict;
    ``CheckpointError`` naming the file where it is not UTF-8 JSON or not an object."""
    file = Path(file)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} holds a {type(data).__name__}, not a JSON object")
    return data


def saved_class_name(folder: Path, what: str) -> str | None:
    """The ``_class_name`` a saved folder's ``config.json`` records (None if it records
    none); CheckpointError where there is no config or it is not JSON. ``what`` names what
    the folder should hold ("an image tokenizer")."""
    config_file = Path(folder) / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}: not {what}")
    return read_json_object(config_file).get("_class_name")


def _cpu_state_dict(
    state_dict_or_module: nn.Module | Mapping[str, torch.Tensor], dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that share no memory, as safetensors requires; tied weights
    are written twice and tied again by loading into the module."""
    if isinstance(state_dict_or_module, nn.Module):
        state = state_dict_or_module.state_dict()
    elif isinstance(state_dict_or_module, Mapping):
        state = state_dict_or_module
    else:
        raise TypeError(f"expected an nn.Module or a state dict, got {type(state_dict_or_module)}")
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state dict entry {key!r} is a {type(tensor).__name__}, not a tensor")
        t = tensor.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.to("cpu").contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _config_dict(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config must be a dataclass instance or a dict, got {type(config)}")


def forget_source_paths(folder: str | os.PathLike) -> list[Path]:
    """Remove ``_name_or_path`` from the ``config.json`` files in ``folder``'s subfolders.

    diffusers records in each component's config the path it was loaded from, and writes
    it back on save, so a model loaded from ``/home/me/run/unet`` and saved again would
    carry that path (and name the saving machine's folders) in what it ships. Returns the
    files it changed.
    """
    changed = []
    for file in sorted(Path(folder).glob("*/" + CONFIG_NAME)):
        config = read_json_object(file)
        if config.pop("_name_or_path", None) is not None:
            file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            changed.append(file)
    return changed


def save_pretrained(
    state_dict_or_module: nn.Module | Mapping[str, torch.Tensor],
    directory: str | os.PathLike,
    config: Mapping[str, Any] | Any,
    *,
    dtype: torch.dtype | None = None,
    card: str | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (and ``card`` as ``README.md``, and
    each of ``extra_files``, name -> text) to ``directory``, atomically.

    ``dtype`` casts floating-point tensors (e.g. ``torch.float16`` for bundled models).
    ``config.json`` also records ``_anygen_version`` and, for a module, ``_class_name``.
    """
    state = _cpu_state_dict(state_dict_or_module, dtype)
    meta: dict[str, Any] = {"_anygen_version": __version__}
    if isinstance(state_dict_or_module, nn.Module):
        meta["_class_name"] = type(state_dict_or_module).__name__
    config_dict = {**meta, **_config_dict(config)}
    try:
        config_text = json.dumps(config_dict, indent=2) + "\n"
    except TypeError as e:
        raise TypeError(f"config is not JSON-serialisable: {e}") from e

    from safetensors.torch import save_file

    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(config_text)
        if card is not None:
            (tmp / CARD_NAME).write_text(card)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    logger.info("saved %d tensors to %s", len(state), directory)
    return directory


# -----------------------------------------------------------------------------
# reading checkpoints


def _weights_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint directory (several for a sharded checkpoint)."""
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
        return [folder / name for name in sorted(set(weight_map.values()))]
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates
    if len(candidates) > 1:
        names = ", ".join(c.name for c in candidates)
        raise CheckpointError(
            f"{folder} has several .safetensors files ({names}) and no {WEIGHTS_NAME}: "
            "give the file's path"
        )
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if len(pickles) == 1:
        return pickles
    present = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
    raise CheckpointError(f"no {WEIGHTS_NAME} in {folder} (it holds: {present})")


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise CheckpointError(f"missing weights file {file}")
    try:
        return load_file(file, device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{file} is truncated or corrupt ({e}); download or save it again"
        ) from None


def _load_pickle(file: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise CheckpointError(
            f"{file} is a pickle checkpoint, which can run code when loaded; anygen loads "
            "safetensors only. Convert it to safetensors, or if you trust the file pass "
            "allow_pickle=True (it is then read with torch.load(weights_only=True))"
        )
    import pickle

    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot read {file} with torch.load(weights_only=True): {first}"
        ) from None
    # Lightning / original Stable Diffusion .ckpt files nest the weights
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file} holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{file} is not a plain state dict: non-tensor entries {_few(bad)}")
    return obj


def load_state_dict(
    path: str | os.PathLike, *, allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file or directory (safetensors, possibly sharded), on CPU."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    files = _weights_files(path) if path.is_dir() else [path]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            state.update(_load_safetensors(file))
        elif file.suffix in PICKLE_SUFFIXES:
            state.update(_load_pickle(file, allow_pickle))
        else:
            raise CheckpointError(
                f"{file} is not a checkpoint file (expected .safetensors, or with "
                f"allow_pickle one of {', '.join(PICKLE_SUFFIXES)})"
            )
    return state


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... and {len(items) - n} more" if len(items) > n else "")


def load_weights(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str | os.PathLike = "checkpoint",
) -> None:
    """Load ``state_dict`` into ``module``, or raise a ``CheckpointError`` that lists the
    missing keys, unexpected keys and shape mismatches (a few of each)."""
    expected = module.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & state_dict.keys())
        if state_dict[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({_few(mismatched)})")
    if problems:
        raise CheckpointError(
            f"{source} does not match {type(module).__name__} built from its config: "
            + "; ".join(problems)
        )
    module.load_state_dict(state_dict, strict=True)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """JSON lists back to tuples, dicts back to nested config dataclasses."""
    if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
        return _build_config(annotation, value, where)
    origin = typing.get_origin(annotation)
    if isinstance(value, list) and (annotation is tuple or origin is tuple):
        return tuple(value)
    if origin in (typing.Union, types.UnionType) and isinstance(value, (list, dict)):
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                return _coerce(value, arg, where)
    return value


def _build_config(config_class: type, values: dict[str, Any], where: str) -> Any:
    """``config_class(**values)``, refusing unknown fields and missing required ones."""
    fields = {f.name: f for f in dataclasses.fields(config_class) if f.init}
    unknown = sorted(values.keys() - fields.keys())
    if unknown:
        raise CheckpointError(
            f"{where} has fields that {config_class.__name__} does not know: {_few(unknown)}"
        )
    absent = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and name not in values
    ]
    if absent:
        raise CheckpointError(
            f"{where} lacks required {config_class.__name__} fields: {_few(absent)}"
        )
    try:
        hints = typing.get_type_hints(config_class)
    except (NameError, TypeError):
        hints = {}
    coerced = {k: _coerce(v, hints.get(k), where) for k, v in values.items()}
    for name, value in coerced.items():
        expected = hints.get(name)
        if expected in (int, float, str, bool) and not _is_a(value, expected):
            raise CheckpointError(
                f"{where}: {name} must be {expected.__name__}, got {type(value).__name__} {value!r}"
            )
    try:
        return config_class(**coerced)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def _is_a(value: Any, expected: type) -> bool:
    """A JSON value of a config field's plain type (an int passes for a float)."""
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def load_config(
    path: str | os.PathLike, config_class: type | None = None, *, class_name: str | None = None
) -> Any:
    """The ``config.json`` of a checkpoint: a dict, or an instance of ``config_class``.

    Keys starting with ``_`` are metadata (class name, anygen version). Fields the
    dataclass does not know, or a ``_class_name`` other than ``class_name``, raise a
    ``CheckpointError``.
    """
    path = Path(path)
    file = path / CONFIG_NAME if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"missing {CONFIG_NAME} in {path}")
    data = read_json_object(file)
    saved_class = data.get("_class_name")
    if class_name is not None and saved_class is not None and saved_class != class_name:
        raise CheckpointError(f"{file} is a checkpoint of {saved_class}, not of {class_name}")
    if config_class is None:
        return data
    if not dataclasses.is_dataclass(config_class):
        raise TypeError(f"config_class must be a dataclass, got {config_class}")
    values = {k: v for k, v in data.items() if not k.startswith("_")}
    where = f"{file} (written by anygen {data.get('_anygen_version', '?')}, this is {__version__})"
    return _build_config(config_class, values, where)


_M = TypeVar("_M", bound="PretrainedMixin")


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for anygen's own ``nn.Module``\\ s.

    The module sets ``config_class`` (its config dataclass), is built as
    ``cls(config)`` and keeps the config as ``self.config``.
    """

    config_class: ClassVar[type]
    config: Any

    def save_pretrained(
        self,
        directory: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        card: str | None = None,
    ) -> Path:
        """Write ``config.json``, ``model.safetensors`` and the optional ``README.md`` card."""
        if not isinstance(self, nn.Module):
            raise TypeError(f"{type(self).__name__} uses PretrainedMixin but is not an nn.Module")
        return save_pretrained(self, directory, self.config, dtype=dtype, card=card)

    @classmethod
    def from_pretrained(
        cls: type[_M],
        name_or_path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> _M:
        """A model from a bundled name, a checkpoint directory or a hub id, in eval mode.

        Weights keep the dtype the module is built in (fp32) unless ``dtype`` is given.
        """
        path = resolve(name_or_path, kind="model")
        if not path.is_dir():
            raise CheckpointError(
                f"{path} is a file; {cls.__name__}.from_pretrained needs a directory "
                f"with {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
        config = load_config(path, cls.config_class, class_name=cls.__name__)
        model = cls(config)
        load_weights(model, load_state_dict(path), source=path)
        return model.to(device=device, dtype=dtype).eval()
