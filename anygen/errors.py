"""Exceptions that carry a message meant for the user.

The CLI prints ``str(error)`` of any ``AnygenError`` as one line on stderr and exits
non-zero; anything else is a bug and keeps its traceback.
"""


class AnygenError(Exception):
    """Base class for errors whose message is for the user."""


class UserInputError(AnygenError, ValueError):
    """Bad input: an empty prompt, a bad size, an unknown option value."""


class ModelNotFoundError(AnygenError, LookupError):
    """A model name, directory or hub id that cannot be resolved."""


class CheckpointError(AnygenError):
    """A checkpoint that is missing files, truncated, corrupt or does not match its config."""


def load_errors() -> tuple[type[BaseException], ...]:
    """What loading a checkpoint raises when its files are missing, truncated or corrupt
    (diffusers and transformers pass safetensors' own error through unwrapped)."""
    from safetensors import SafetensorError

    return (OSError, ValueError, RuntimeError, KeyError, SafetensorError)
