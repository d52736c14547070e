"""Text to image with a Parti-style stack (the ``parti`` path).

``Parti`` holds a ``PartiTransformer`` (text encoder + autoregressive decoder over image
codes), the text tokenizer and the image tokenizer whose decoder renders the codes. It
takes the same ``Options`` as the ``ldm`` path; diffusion settings (steps, scheduler) have
no meaning here and are refused with a clear message rather than ignored.

A saved model is a directory:

    config.json          PartiConfig, "_class_name": "PartiTransformer"
    text_encoder/        transformers T5EncoderModel
    decoder/             transformers GPT2LMHeadModel (with cross-attention)
    anygen.json          family, defaults (guidance, temperature, top-k, top-p), known words,
                         and where the tokenizers are: a subfolder or a bundled name / hub id
    tokenizer/           the text tokenizer, unless anygen.json names a bundled one
    image_tokenizer/     the image tokenizer, unless anygen.json names a bundled one
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from anygen.data.datasets import tensor_to_images
from anygen.errors import CheckpointError, UserInputError
from anygen.hub import atomic_directory
from anygen.models.parti import PartiTransformer, generate_codes, tokenize_prompts
from anygen.pipelines.base import (
    EDIT_SETTINGS,
    Options,
    Output,
    TextToImage,
    Timer,
    check_batch,
    check_negative_code_guidance,
    make_generator,
    part_location,
    read_model_meta,
    write_model_files,
)
from anygen.tokenizers.text import load_text_tokenizer
from anygen.tokenizers.vq import ImageTokenizer, load_image_tokenizer

log = logging.getLogger(__name__)

DEFAULTS = {"guidance_scale": 3.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


class Parti(TextToImage):
    """Text -> image codes -> image, behind ``generate(prompt, options) -> Output``."""

    family = "parti"

    def __init__(
        self,
        transformer: PartiTransformer,
        tokenizer,
        image_tokenizer: ImageTokenizer,
        *,
        name: str = "parti",
        defaults: dict | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        c = transformer.config
        if image_tokenizer.codebook_size != c.image_vocab_size:
            raise CheckpointError(
                f"the image tokenizer has {image_tokenizer.codebook_size} codes, the transformer "
                f"predicts {c.image_vocab_size}"
            )
        if image_tokenizer.grid_size**2 != c.image_tokens:
            raise CheckpointError(
                f"the image tokenizer makes {image_tokenizer.grid_size**2} codes an image, the "
                f"transformer writes {c.image_tokens}"
            )
        self.transformer = transformer.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.image_tokenizer = image_tokenizer.to(device=device, dtype=dtype).eval()
        self.name = name
        self.defaults = {**DEFAULTS, **(defaults or {})}
        self.device = torch.device(device)
        self.dtype = dtype

    @property
    def default_size(self) -> int:
        return self.image_tokenizer.image_size

    def check_options(self, opts: Options) -> None:
        """Refuse what this path cannot honour, naming why."""
        size = self.default_size
        if opts.steps is not None:
            raise UserInputError(
                f"--steps means nothing to {self.name!r}: a parti model writes exactly "
                f"{self.transformer.config.image_tokens} image codes, one per step; leave it out"
            )
        if opts.scheduler is not None:
            raise UserInputError(
                f"--scheduler means nothing to {self.name!r} (parti samples codes, it has no "
                "diffusion scheduler); use --temperature, --top-k, --top-p"
            )
        for label, value in (("width", opts.width), ("height", opts.height)):
            if value is not None and value != size:
                raise UserInputError(
                    f"{label} {value}: {self.name!r} makes {size} x {size} images only "
                    f"(its image tokenizer's size)"
                )
        opts.refuse(
            (*EDIT_SETTINGS, "max_new_tokens", "max_images"),
            f"means nothing to {self.name!r}: a parti model draws one picture from a prompt",
        )

    def generate_batch(
        self, prompts: list[str], seeds: list[int], options: Options | None = None
    ) -> Output:
        """One image per (prompt, seed); image i depends on prompt i and seed i only."""
        opts = check_batch(prompts, seeds, options)
        self.check_options(opts)
        d = self.defaults
        guidance = opts.guidance_scale if opts.guidance_scale is not None else d["guidance_scale"]
        temperature = opts.temperature if opts.temperature is not None else d["temperature"]
        top_k = opts.top_k if opts.top_k is not None else d["top_k"]
        top_p = opts.top_p if opts.top_p is not None else d["top_p"]
        check_negative_code_guidance(opts.negative_prompt, guidance)
        timer = Timer()
        c = self.transformer.config
        with timer("text"):
            ids, mask = tokenize_prompts(self.tokenizer, prompts, c)
            null_ids = null_mask = None
            if guidance != 1.0:
                null_ids, null_mask = tokenize_prompts(
                    self.tokenizer, [opts.negative_prompt or ""] * len(prompts), c
                )
                null_ids, null_mask = null_ids.to(self.device), null_mask.to(self.device)
        generators = [make_generator(s, self.device) for s in seeds]
        with timer("decode_codes"):
            codes = generate_codes(
                self.transformer,
                ids.to(self.device),
                mask.to(self.device),
                null_ids,
                null_mask,
                guidance_scale=guidance,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generators=generators,
                callback=opts.callback,
                progress=opts.progress,
            )
        with timer("render"):
            images = tensor_to_images(self.image_tokenizer.decode(codes))
        settings = {
            "guidance_scale": guidance,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "width": self.default_size,
            "height": self.default_size,
            "negative_prompt": opts.negative_prompt,
            "image_tokens": c.image_tokens,
            "seeds": list(seeds),
        }
        return Output(
            segments=images,
            seed=seeds[0],
            model=self.name,
            timings=timer.timings,
            settings=settings,
        )

    # ------------------------------------------------------------------ save / load

    def save_pretrained(
        self,
        directory: str | Path,
        *,
        card: str | None = None,
        dtype: torch.dtype | None = None,
        tokenizer_ref: str | None = None,
        image_tokenizer_ref: str | None = None,
        extra_files: dict[str, str] | None = None,
    ) -> Path:
        """Write the model directory atomically. ``tokenizer_ref``/``image_tokenizer_ref``
        (a bundled name or hub id) are recorded instead of copying that tokenizer in."""
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            self.transformer.save_pretrained(tmp, dtype=dtype)
            if tokenizer_ref is None:
                self.tokenizer.save_pretrained(tmp / "tokenizer")
            if image_tokenizer_ref is None:
                self.image_tokenizer.save_pretrained(tmp / "image_tokenizer", dtype=dtype)
            meta = {
                "family": self.family,
                "tokenizer": tokenizer_ref or "tokenizer",
                "image_tokenizer": image_tokenizer_ref or "image_tokenizer",
                **self.defaults,
            }
            write_model_files(tmp, meta, card, extra_files)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        name: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Parti:
        path = Path(path)
        meta = read_model_meta(path, "a saved parti model")
        transformer = PartiTransformer.from_pretrained(path)
        tokenizer = load_text_tokenizer(part_location(path, meta, "tokenizer"))
        image_tokenizer = load_image_tokenizer(part_location(path, meta, "image_tokenizer"))
        defaults = {
            k: v for k, v in meta.items() if k not in ("family", "tokenizer", "image_tokenizer")
        }
        return cls(
            transformer,
            tokenizer,
            image_tokenizer,
            name=name or path.name,
            defaults=defaults,
            device=device,
            dtype=dtype,
        )
