"""The user's defaults: which model, device and dtype to use when none is given.

Looked up in this order, first found wins, per key:

1. the environment: ``ANYGEN_MODEL``, ``ANYGEN_DEVICE``, ``ANYGEN_DTYPE``;
2. ``$XDG_CONFIG_HOME/anygen/config.toml`` (``~/.config/anygen/config.toml`` when
   ``XDG_CONFIG_HOME`` is unset), keys ``model``, ``device``, ``dtype``, and a ``[models]``
   table whose per-command entries win over ``model`` for their command::

       model = "sdxl"
       device = "cuda"
       dtype = "bf16"

       [models]
       caption = "llava-1.5-7b"
       story = "shapes-fusion"

3. built-in: the bundled model that does the command's task best (``shapes-fusion`` for
   ``caption``, ``ask`` and ``story``, which read images or write text and pictures;
   ``shapes-edit``, the instruction editor, for ``edit``; ``shapes-ldm`` for ``generate``),
   device and dtype chosen by ``anygen.pipelines.pick_device`` / ``pick_dtype``. Both run
   offline.
"""

from __future__ import annotations

import os
from pathlib import Path

from anygen.errors import UserInputError

DEFAULT_MODEL = "shapes-ldm"
# without a user default, these commands use shapes-fusion: shapes-ldm cannot caption, answer
# or tell stories, and it edits by img2img, reading the instruction as a caption (validation
# edits, seeds 1000 and 2000: 16 of 200 right, against shapes-fusion's 71). Edits go to
# shapes-edit, the instruction editor on shapes-dit (validation edits, seed 1000: 89 of 100
# right as shipped, against shapes-fusion's 36)
TASK_DEFAULTS = {
    "caption": "shapes-fusion",
    "ask": "shapes-fusion",
    "story": "shapes-fusion",
    "edit": "shapes-edit",
}
KEYS = ("model", "device", "dtype")
COMMANDS = ("generate", "caption", "ask", "story", "edit")
ENV = {"model": "ANYGEN_MODEL", "device": "ANYGEN_DEVICE", "dtype": "ANYGEN_DTYPE"}


def config_path() -> Path:
    """Where the user config lives (it need not exist)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "anygen" / "config.toml"


def read_config_file(path: Path | None = None) -> dict:
    """The known keys of the config file; {} when there is none. A malformed file or an
    unknown key is an error that names the file, never silently ignored. The ``models`` table,
    where there is one, comes back as a dict from command to model."""
    path = config_path() if path is None else path
    if not path.is_file():
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise UserInputError(
                f"reading {path} needs Python 3.11 or the tomli package (pip install tomli)"
            ) from None
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"{path} is not valid TOML: {e}") from None
    except OSError as e:
        raise UserInputError(f"cannot read {path}: {e.strerror}") from None
    data = dict(data)
    models = data.pop("models", {})
    _check_keys(path, data, (*KEYS, "models"), "keys")  # models is popped: listed, never bad
    if not isinstance(models, dict):
        raise UserInputError(f"{path}: models must be a table ([models], one command a line)")
    _check_keys(path, models, COMMANDS, "commands in [models]")
    data = {k: v.strip() for k, v in data.items()}  # as the environment's values are
    if models:
        data["models"] = {k: v.strip() for k, v in models.items()}
    return data


def _check_keys(path: Path, table: dict, known: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise UserInputError(
            f"{path}: unknown {what} {', '.join(unknown)}; known {what} are {', '.join(known)}"
        )
    bad = [k for k, v in table.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise UserInputError(f"{path}: {', '.join(bad)} must be non-empty strings")


def user_default(key: str) -> str | None:
    """The user's default for ``key`` ("model", "device" or "dtype"), or None."""
    if key not in KEYS:
        raise ValueError(f"key must be one of {KEYS}, got {key!r}")
    value = os.environ.get(ENV[key], "").strip()
    if value:
        return value
    return read_config_file().get(key)


def default_model(task: str = "generate") -> str:
    """``ANYGEN_MODEL``, else the config file's ``[models]`` entry for ``task`` (a command's
    name), else its ``model``, else the bundled model for ``task``: ``shapes-fusion`` for
    caption, ask and story, ``shapes-edit`` for edit, ``shapes-ldm`` for generate."""
    if task not in COMMANDS:
        raise ValueError(f"task must be one of {COMMANDS}, got {task!r}")
    env = os.environ.get(ENV["model"], "").strip()
    if env:
        return env
    config = read_config_file()
    return (
        config.get("models", {}).get(task)
        or config.get("model")
        or TASK_DEFAULTS.get(task, DEFAULT_MODEL)
    )
