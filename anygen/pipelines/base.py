"""The one generator interface every path implements (DESIGN.md, "Contracts").

``generate(prompt_or_segments, options) -> Output``: ``Options`` holds what a user
chooses per call (seed, guidance, steps or sampling settings, size, count); ``Output``
holds what came back (images, text segments, the seed used, timings).
"""

from __future__ import annotations

import json
import math
import numbers
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from PIL import Image

from anygen.errors import CheckpointError, UserInputError

Segment = str | Image.Image
# callback(step, total_steps, info) after each denoising / decoding step
StepCallback = Callable[[int, int, dict], None]

MAX_SEED = 2**63 - 1
# Written beside a saved model's weights: its family, defaults and where its parts are.
ANYGEN_FILE = "anygen.json"


# How errors name Options' fields: the words of the CLI's flags.
SETTING_LABELS = {
    "guidance_scale": "guidance",
    "negative_prompt": "negative prompt",
    "steps": "steps",
    "width": "width",
    "height": "height",
    "scheduler": "scheduler",
    "temperature": "temperature",
    "top_k": "top-k",
    "top_p": "top-p",
    "max_new_tokens": "max new tokens",
    "max_images": "max images",
    "strength": "strength",
    "image_guidance_scale": "image guidance",
}
# settings of the two kinds of sampler, and of editing
TOKEN_SETTINGS = ("temperature", "top_k", "top_p", "max_new_tokens")
DIFFUSION_SETTINGS = ("steps", "scheduler")
EDIT_SETTINGS = ("strength", "image_guidance_scale")


@dataclass
class Options:
    """Per-call generation settings. ``None`` means "the model's default"."""

    seed: int | None = None  # None: a fresh seed is drawn and recorded in the Output
    num_images: int = 1
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    steps: int | None = None  # diffusion steps; meaningless for autoregressive paths
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None  # diffusion sampler name
    temperature: float | None = None  # autoregressive sampling
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None  # text generation budget (per text segment)
    max_images: int | None = None  # interleaved generation: the most images to write
    strength: float | None = None  # editing: how far from the input image (0: none, 1: all)
    image_guidance_scale: float | None = None  # editing: pull towards the input image
    callback: StepCallback | None = None
    progress: bool = True

    def validate(self) -> Options:
        """Raise ``UserInputError`` naming the first bad value; return self."""
        for name in ("guidance_scale", "temperature", "top_p", "strength", "image_guidance_scale"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise UserInputError(
                    f"{name.replace('_', ' ')} must be a finite number, got {value}"
                )
        if self.seed is not None and not (0 <= self.seed <= MAX_SEED):
            raise UserInputError(f"seed must be between 0 and {MAX_SEED}, got {self.seed}")
        if self.num_images < 1:
            raise UserInputError(f"number of images must be at least 1, got {self.num_images}")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise UserInputError(f"guidance scale must be >= 0, got {self.guidance_scale}")
        if self.steps is not None and self.steps < 1:
            raise UserInputError(f"steps must be at least 1, got {self.steps}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserInputError(f"{name} must be a positive number of pixels, got {value}")
        if self.temperature is not None and self.temperature < 0:
            raise UserInputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise UserInputError(f"top-k must be >= 0 (0 disables it), got {self.top_k}")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise UserInputError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise UserInputError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if self.max_images is not None and self.max_images < 0:
            raise UserInputError(f"max images must be >= 0, got {self.max_images}")
        if self.strength is not None and not (0 < self.strength <= 1):
            raise UserInputError(f"strength must be in (0, 1], got {self.strength}")
        if self.image_guidance_scale is not None and self.image_guidance_scale < 0:
            raise UserInputError(
                f"image guidance scale must be >= 0, got {self.image_guidance_scale}"
            )
        if self.negative_prompt is not None:
            check_text(self.negative_prompt, "negative prompt")
        return self

    def refuse(self, names: Sequence[str], why: str) -> None:
        """Raise ``UserInputError`` "<setting> <why>" for the first of ``names`` that is set.

        For settings a path cannot honour: better one clear line than silently ignored."""
        for name in names:
            if getattr(self, name) is not None:
                raise UserInputError(f"{SETTING_LABELS[name]} {why}")

    def to_dict(self) -> dict:
        """The settings worth recording (no callback)."""
        skip = {"callback", "progress"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


@dataclass
class Output:
    """What a generator returns: images and text, in order, with the seed that made them."""

    segments: list[Segment] = field(default_factory=list)
    seed: int = 0
    model: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)  # resolved options (steps, guidance, ...)

    @property
    def images(self) -> list[Image.Image]:
        return [s for s in self.segments if isinstance(s, Image.Image)]

    @property
    def texts(self) -> list[str]:
        return [s for s in self.segments if isinstance(s, str)]


@runtime_checkable
class Generator(Protocol):
    """Every path (``ldm``, ``parti``, ``fusion``) implements this. A generator that reads
    images also has ``caption(images, options) -> list[str]`` and
    ``answer(images, questions, options) -> list[str]``; one that edits has
    ``edit(image, instruction, options) -> Output``."""

    name: str

    def generate(
        self, prompt: str | Sequence[Segment], options: Options | None = None
    ) -> Output: ...


def resolve_seed(seed: int | None) -> int:
    """The seed to use: the given one, or a fresh one drawn from the OS (then recorded)."""
    if seed is None:
        return random.SystemRandom().randrange(0, 2**31)
    return int(seed)


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The only source of randomness in a generation call."""
    device = torch.device(device)
    return torch.Generator(device=device.type if device.type != "mps" else "cpu").manual_seed(seed)


def check_seed(seed: int) -> None:
    """A per-image seed: an integer torch.Generator accepts."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise UserInputError(f"a seed must be an integer, got {seed!r}")
    if not 0 <= seed <= MAX_SEED:
        raise UserInputError(f"seed must be between 0 and {MAX_SEED}, got {seed}")


def check_text(text: str, what: str = "prompt") -> None:
    """Text that cannot be written as UTF-8 (lone surrogates: bytes a terminal or file
    passed undecoded) is refused before a model spends time on it and before a PNG or a
    story file fails to record it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserInputError(
            f"the {what} is not valid UTF-8 text (character {e.start + 1}, {text[e.start]!r}); "
            "check the terminal's or the file's encoding"
        ) from None


def check_prompt(prompt: str | Sequence[Segment]) -> None:
    """Empty prompts and empty segment lists are errors, not silent blank images."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserInputError("the prompt is empty")
        check_text(prompt)
        return
    if not prompt:
        raise UserInputError("the prompt has no segments")
    for i, segment in enumerate(prompt):
        if not isinstance(segment, (str, Image.Image)):
            raise UserInputError(
                f"segment {i} is a {type(segment).__name__}; segments are str or PIL.Image"
            )
        if isinstance(segment, str):
            check_text(segment, f"text of segment {i}")


def check_batch(prompts: Sequence[str], seeds: Sequence[int], options: Options | None) -> Options:
    """What every ``generate_batch`` checks first: one seed per prompt, no empty prompt,
    valid options. Returns the validated options (the defaults when none were given)."""
    if len(prompts) != len(seeds):
        raise UserInputError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not prompts:
        raise UserInputError("no prompts given")
    for p in prompts:
        check_prompt(p)
    for s in seeds:
        check_seed(s)
    return (options or Options()).validate()


class Timer:
    """Collects named wall-clock timings: ``with timer("denoise"): ...``."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


class TextToImage:
    """What the text-to-image paths (``ldm``, ``parti``) share: ``generate`` over their own
    ``generate_batch(prompts, seeds, options)``, and the words the model knows."""

    name: str
    family: str
    defaults: dict

    def generate_batch(
        self, prompts: list[str], seeds: list[int], options: Options | None = None
    ) -> Output:
        raise NotImplementedError

    @property
    def known_words(self) -> set[str] | None:
        """Words the model saw in training, when its card recorded them."""
        words = self.defaults.get("known_words")
        return set(words) if words else None

    def unknown_words(self, text: str) -> list[str]:
        """Words of ``text`` the model never saw in training (empty when it did not record)."""
        known = self.known_words
        if not known:
            return []
        words = re.findall(r"[a-z]+", text.lower())
        return sorted({w for w in words if w not in known})

    def generate(self, prompt: str | Sequence[Segment], options: Options | None = None) -> Output:
        """``options.num_images`` images of one prompt; image i is made from seed + i."""
        if not isinstance(prompt, str):
            check_prompt(prompt)
            texts = [s for s in prompt if isinstance(s, str)]
            if len(texts) != len(prompt):
                raise UserInputError(
                    f"model {self.name!r} ({self.family}) takes a text prompt; images in the "
                    "prompt need a fusion model"
                )
            prompt = " ".join(texts)
        opts = (options or Options()).validate()
        check_prompt(prompt)
        seed = resolve_seed(opts.seed)
        out = self.generate_batch(
            [prompt] * opts.num_images, [seed + i for i in range(opts.num_images)], opts
        )
        out.seed = seed
        return out


# ------------------------------------------------------------------ saved model directories


def write_model_files(
    folder: Path,
    meta: dict,
    card: str | None = None,
    extra_files: dict[str, str] | None = None,
) -> None:
    """``anygen.json`` (``meta``), the ``README.md`` card and extra text files of a model
    directory being written (``folder`` is the temporary one of ``atomic_directory``)."""
    (folder / ANYGEN_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if card is not None:
        (folder / "README.md").write_text(card)
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)


def read_model_meta(path: Path, what: str) -> dict:
    """The ``anygen.json`` of a saved model directory (``what``: "a saved parti model"...)."""
    meta_file = Path(path) / ANYGEN_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{path} has no {ANYGEN_FILE}: not {what}")
    from anygen.hub import read_json_object

    return read_json_object(meta_file)


def part_location(path: Path, meta: dict, key: str) -> str:
    """Where the part ``key`` of a saved model is: its subfolder, or the bundled name or hub
    id that ``anygen.json`` records instead of a copy."""
    ref = meta.get(key, key)
    return str(Path(path) / ref) if (Path(path) / ref).is_dir() else ref


def check_negative_code_guidance(negative_prompt: str | None, guidance: float) -> None:
    """Token models (parti, fusion) run classifier-free guidance at every scale but 1,
    where a negative prompt would be dropped: refuse it there."""
    if negative_prompt is not None and guidance == 1.0:
        raise UserInputError(
            "a negative prompt needs guidance other than 1 (it steers classifier-free "
            "guidance, which is off at 1)"
        )


def check_negative_guidance(negative_prompt: str | None, guidance: float | None) -> None:
    """A negative prompt acts only through classifier-free guidance, which diffusion
    pipelines run only above guidance 1: refuse it there rather than drop it."""
    if negative_prompt is not None and guidance is not None and guidance <= 1.0:
        raise UserInputError(
            f"a negative prompt needs guidance above 1 (it steers classifier-free guidance); "
            f"got guidance {guidance}"
        )
