"""Interleaved text and images with one early-fusion transformer (the ``fusion`` path).

``Fusion`` holds a ``FusionTransformer``, the text tokenizer, and the image representation
the model was trained with: an image tokenizer (``discrete``: VQ codes, decoded by the VQ
decoder) or a ``VisualCodec`` (``continuous``: encoder embeddings, rendered by the
diffusion decoder). Every capability is a special case of one interleaved decoder
(``anygen.models.fusion.decode_stream``):

    gen.generate(["a red circle", image, "the red circle grows"], options)   # -> Output
    gen.generate("a red circle", Options(num_images=4))                      # text -> image
    gen.caption(images)                    # image -> text
    gen.answer(images, questions)          # visual question answering
    for segment in gen.stream(segments, options): ...   # each segment as soon as it is ready

A saved model is a directory:

    config.json, model.safetensors   FusionConfig ("_class_name": "FusionTransformer")
    anygen.json      family, defaults, and where the tokenizers are (a subfolder, or a
                     bundled name / hub id)
    tokenizer/       the text tokenizer, unless anygen.json names a bundled one
    image_tokenizer/ (discrete) or visual/ (continuous), unless anygen.json names one
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

from anygen.data.datasets import images_to_tensor, tensor_to_images
from anygen.data.documents import CAPTION_QUESTION, question_text
from anygen.errors import CheckpointError, UserInputError
from anygen.hub import atomic_directory
from anygen.models.fusion import (
    FusionTransformer,
    Plan,
    Prompt,
    Sampling,
    decode_stream,
    log_likelihood,
)
from anygen.pipelines.base import (
    EDIT_SETTINGS,
    Options,
    Output,
    Segment,
    TextToImage,
    Timer,
    check_batch,
    check_negative_code_guidance,
    check_prompt,
    make_generator,
    part_location,
    read_model_meta,
    resolve_seed,
    write_model_files,
)
from anygen.pipelines.runtime import auto_attention
from anygen.tokenizers.text import load_text_tokenizer
from anygen.tokenizers.visual import VisualCodec, load_visual_codec
from anygen.tokenizers.vq import ImageTokenizer, load_image_tokenizer

log = logging.getLogger(__name__)

DEFAULTS = {
    "guidance_scale": 3.0,  # image spans
    "temperature": 1.0,  # image codes
    "top_k": 0,
    "top_p": 1.0,
    "text_temperature": 0.0,  # captions and answers: greedy
    "story_temperature": 1.0,  # story events: sampled (seeded)
    "caption_candidate_temperature": 0.5,  # best_captions: the sampled candidates
    "max_new_tokens": 24,
}
# the keys of a saved model's anygen.json that name its parts; the rest are its defaults
PART_KEYS = ("family", "tokenizer", "image_tokenizer", "visual")
# what ``Fusion.score`` can measure (see there)
SCORES = ("caption", "pmi")


class Fusion(TextToImage):
    """An early-fusion model behind the generator interface, plus caption / answer /
    stream."""

    family = "fusion"

    def __init__(
        self,
        transformer: FusionTransformer,
        tokenizer,
        images: ImageTokenizer | VisualCodec,
        *,
        name: str = "fusion",
        defaults: dict | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        c = transformer.config
        if c.continuous:
            if not isinstance(images, VisualCodec):
                raise CheckpointError("a continuous fusion model needs a VisualCodec")
            if (images.num_embeddings, images.visual_dim) != (c.image_tokens, c.visual_dim):
                raise CheckpointError(
                    f"the visual codec makes {images.num_embeddings} x {images.visual_dim} "
                    f"embeddings an image, the transformer reads {c.image_tokens} x "
                    f"{c.visual_dim}"
                )
        else:
            if images.codebook_size != c.image_vocab_size:
                raise CheckpointError(
                    f"the image tokenizer has {images.codebook_size} codes, the transformer "
                    f"{c.image_vocab_size}"
                )
            if images.grid_size**2 != c.image_tokens:
                raise CheckpointError(
                    f"the image tokenizer makes {images.grid_size**2} codes an image, the "
                    f"transformer {c.image_tokens}"
                )
        if len(tokenizer) > c.text_vocab_size:
            raise CheckpointError(
                f"the text tokenizer has {len(tokenizer)} tokens, the transformer "
                f"{c.text_vocab_size}"
            )
        self.transformer = transformer.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.images = images.to(device=device, dtype=dtype).eval()
        if isinstance(images, VisualCodec):  # its diffusion decoder: xformers where usable
            auto_attention({"unet": images.unet, "vae": images.vae}, device)
        self.name = name
        self.defaults = {**DEFAULTS, **(defaults or {})}
        self.device = torch.device(device)
        self.dtype = dtype

    @property
    def config(self):
        return self.transformer.config

    @property
    def default_size(self) -> int:
        return self.images.image_size

    # ------------------------------------------------------------------ segments <-> model

    def text_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def encode_images(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """PIL images -> codes (N,) or embeddings (N, visual_dim) each; images of another
        size are resized (bicubic) to the model's."""
        if not images:
            return []
        x = images_to_tensor(list(images), size=self.default_size).to(self.device, self.dtype)
        if self.config.continuous:
            return list(self.images.encode(x).float().cpu())
        return list(self.images.encode(x).reshape(len(images), -1).cpu())

    def render(
        self, pieces: Sequence[torch.Tensor], generators: Sequence[torch.Generator]
    ) -> list[Image.Image]:
        """Codes or embeddings -> PIL images, by the VQ decoder or the diffusion decoder
        (which draws its noise from ``generators``, one per image)."""
        if not pieces:
            return []
        stacked = torch.stack(list(pieces)).to(self.device)
        if self.config.continuous:
            x = self.images.decode(stacked.to(self.dtype), list(generators))
        else:
            x = self.images.decode(stacked)
        return tensor_to_images(x)

    def prompt(
        self,
        segments: Sequence[Segment],
        *,
        end: Sequence[int] = (),
        encoded: Sequence[torch.Tensor] | None = None,
    ) -> Prompt:
        """Segments -> a decoder prompt: <bos>, text ids, images as <boi> codes <eoi> (or
        placeholders with their embeddings), then ``end`` ids. ``encoded``: the images'
        codes or embeddings (``encode_images``), in order, where the caller has them."""
        c = self.config
        check_prompt(list(segments))
        ids = [c.bos_id]
        pictures = [s for s in segments if isinstance(s, Image.Image)]
        if encoded is None:
            encoded = self.encode_images(pictures)
        elif len(encoded) != len(pictures):
            raise ValueError(f"{len(encoded)} encoded images for {len(pictures)} pictures")
        encoded = iter(encoded)
        visual = []
        for s in segments:
            if isinstance(s, str):
                ids += self.text_ids(s)
                continue
            data = next(encoded)
            if c.continuous:
                ids += [c.boi_id, *[c.img_id] * c.image_tokens, c.eoi_id]
                visual.append(data)
            else:
                ids += [c.boi_id, *(data + c.image_offset).tolist(), c.eoi_id]
        ids += list(end)
        if len(ids) + c.image_span > c.max_position_embeddings:
            raise UserInputError(
                f"the prompt is {len(ids)} tokens; this model reads at most "
                f"{c.max_position_embeddings} including what it writes"
            )
        return Prompt(ids, torch.stack(visual) if visual else None)

    def image_prompts(
        self,
        images: Sequence[Image.Image],
        texts: Sequence[str],
        *,
        ends: Sequence[Sequence[int]] | None = None,
    ) -> list[Prompt]:
        """One prompt per image: the image, its text, then ``ends[i]`` ids; the images
        encoded in one batch rather than one at a time."""
        encoded = self.encode_images(images)
        ends = ends if ends is not None else [()] * len(images)
        return [
            self.prompt([im, t], end=e, encoded=[x])
            for im, t, e, x in zip(images, texts, ends, encoded, strict=True)
        ]

    def sampling(self, opts: Options, text_default: str) -> Sampling:
        """Sampling settings: the options where given, else the model's defaults.
        ``text_default`` names the default text temperature of the task ("text_temperature"
        for captions and answers, "story_temperature" for interleaved writing); the
        temperature option, when given, sets text and image codes alike."""
        d = self.defaults

        def pick(value, key):
            return d[key] if value is None else value

        top_k, top_p = pick(opts.top_k, "top_k") or None, pick(opts.top_p, "top_p")
        negative = self.text_ids(opts.negative_prompt) if opts.negative_prompt else None
        check_negative_code_guidance(
            opts.negative_prompt, pick(opts.guidance_scale, "guidance_scale")
        )
        return Sampling(
            temperature=pick(opts.temperature, text_default),
            top_k=top_k,
            top_p=top_p,
            image_temperature=pick(opts.temperature, "temperature"),
            image_top_k=top_k,
            image_top_p=top_p,
            guidance_scale=pick(opts.guidance_scale, "guidance_scale"),
            negative_ids=negative,
        )

    def check_options(self, opts: Options) -> None:
        size = self.default_size
        if opts.steps is not None and not self.config.continuous:
            raise UserInputError(
                f"--steps means nothing to {self.name!r}: a discrete fusion model writes "
                f"exactly {self.config.image_tokens} image codes; leave it out"
            )
        if opts.scheduler is not None:
            raise UserInputError(
                f"--scheduler means nothing to {self.name!r}; use --temperature, --top-k, --top-p"
            )
        opts.refuse(
            EDIT_SETTINGS,
            f"means nothing to {self.name!r}: it edits by instruction, writing the whole "
            "picture anew; leave it out",
        )
        if opts.callback is not None:  # its decode loop interleaves rows and phases
            raise UserInputError(f"{self.name} takes no step callback")
        for label, value in (("width", opts.width), ("height", opts.height)):
            if value is not None and value != size:
                raise UserInputError(
                    f"{label} {value}: {self.name!r} makes {size} x {size} images only"
                )

    def _settings(
        self, s: Sampling, opts: Options, seeds: Sequence[int], *, writes_text: bool = True
    ) -> dict:
        """What a run was drawn with; a run that writes only a picture (text to image, an
        edit, a subject) records no text temperature, since it samples no text."""
        text = {"text_temperature": s.temperature} if writes_text else {}
        return {
            "guidance_scale": s.guidance_scale,
            "temperature": s.image_temperature,
            **text,
            "top_k": s.image_top_k or 0,
            "top_p": s.image_top_p,
            "negative_prompt": opts.negative_prompt,
            "width": self.default_size,
            "height": self.default_size,
            "image_tokens": self.config.image_tokens,
            "image_mode": self.config.image_mode,
            "steps": opts.steps if self.config.continuous else None,
            "seeds": list(seeds),
        }

    # ------------------------------------------------------------------ the one loop

    def run(
        self,
        prompts: Sequence[Prompt],
        plan: Plan,
        sampling: Sampling,
        seeds: Sequence[int],
        *,
        steps: int | None = None,
        on_phase: Callable[[int, str, list[torch.Generator]], None] | None = None,
    ) -> Iterator[tuple[int, Segment | None]]:
        """Decode and yield ``(row, segment)`` as each is ready: text as a str, images
        rendered to PIL (``None`` marks a row's <eos>)."""
        generators = [make_generator(s, self.device) for s in seeds]
        hook = None
        if on_phase is not None:
            hook = lambda i, phase: on_phase(i, phase, generators)  # noqa: E731
        stream = decode_stream(self.transformer, prompts, plan, sampling, generators, on_phase=hook)
        for row, kind, value in stream:
            if kind == "text":
                yield row, self.decode_text(value)
            elif kind == "image":
                if self.config.continuous:
                    x = self.images.decode(
                        value[None].to(self.device, self.dtype), [generators[row]], steps=steps
                    )
                    yield row, tensor_to_images(x)[0]
                else:
                    yield row, self.render([value], [generators[row]])[0]
            else:
                yield row, None

    # ------------------------------------------------------------------ text -> image

    def generate_batch(
        self, prompts: list[str], seeds: list[int], options: Options | None = None
    ) -> Output:
        """One image per (prompt, seed); image i depends on prompt i and seed i only."""
        opts = check_batch(prompts, seeds, options)
        self.check_options(opts)
        timer = Timer()
        s = self.sampling(opts, "temperature")
        with timer("prompt"):
            rows = [self.prompt([p], end=[self.config.boi_id]) for p in prompts]
        generators = [make_generator(seed, self.device) for seed in seeds]
        with timer("decode"):
            pieces = self.next_pieces(rows, s, generators)
        with timer("render"):
            if self.config.continuous:
                x = self.images.decode(
                    torch.stack(pieces).to(self.device, self.dtype), generators, steps=opts.steps
                )
                images = tensor_to_images(x)
            else:
                images = self.render(pieces, generators)
        return Output(
            segments=images,
            seed=seeds[0],
            model=self.name,
            timings=timer.timings,
            settings=self._settings(s, opts, seeds, writes_text=False),
        )

    def next_pieces(
        self, rows: Sequence[Prompt], sampling: Sampling, generators: Sequence[torch.Generator]
    ) -> list[torch.Tensor]:
        """The picture each prompt row (ending with <boi>) goes on with, unrendered: codes
        (N,) or regressed embeddings (N, visual_dim). A decoder learns to render these."""
        pieces: list[torch.Tensor] = [None] * len(rows)  # type: ignore[list-item]
        stream = decode_stream(self.transformer, rows, Plan(["image"]), sampling, generators)
        for row, kind, value in stream:
            if kind == "image":
                pieces[row] = value
        return pieces

    def _one_image(self, segments: list[Segment], opts: Options) -> Output:
        """The picture that follows ``segments`` (an edit, a subject-driven prompt)."""
        self.check_options(opts)
        seed = resolve_seed(opts.seed)
        timer = Timer()
        s = self.sampling(opts, "temperature")
        with timer("prompt"):
            row = self.prompt(segments, end=[self.config.boi_id])
        with timer("decode"):
            (image,) = [
                seg for _, seg in self.run([row], Plan(["image"]), s, [seed], steps=opts.steps)
            ]
        return Output(
            segments=[image],
            seed=seed,
            model=self.name,
            timings=timer.timings,
            settings=self._settings(s, opts, [seed], writes_text=False),
        )

    def edit(self, image: Image.Image, instruction: str, options: Options | None = None) -> Output:
        """``image`` changed as ``instruction`` says (the shapes world's edits: "make the red
        circle blue", "move ... to the top left", ...): the model reads the image and the
        instruction in its sequence and writes the edited picture."""
        opts = (options or Options()).validate()
        _check_images([image])
        if not instruction.strip():
            raise UserInputError("the instruction is empty")
        return self._one_image([image, instruction], opts)

    def generate_subject(
        self,
        references: Sequence[Image.Image],
        prompt: str,
        options: Options | None = None,
    ) -> Output:
        """In-context subject-driven generation (Emu2-Gen): 1 or more reference pictures of
        a subject, then a prompt naming it (``the sks circle above a green square``), and
        the picture the model writes; no fine-tuning."""
        opts = (options or Options()).validate()
        _check_images(references)
        check_prompt(prompt)
        return self._one_image([*references, prompt], opts)

    # ------------------------------------------------------------------ interleaved

    def generate(self, prompt: str | Sequence[Segment], options: Options | None = None) -> Output:
        """A text prompt: ``num_images`` images (text -> image). A list of segments: the
        model continues it, writing text and images as it chooses, until it ends the
        document or writes ``max_images`` images (Options.max_images, default 1)."""
        if isinstance(prompt, str):
            return super().generate(prompt, options)
        opts = (options or Options()).validate()
        seed = resolve_seed(opts.seed)
        timer = Timer()
        segments: list[Segment] = []
        with timer("generate"):
            for _, segment in self.stream(prompt, opts, seed=seed):
                if segment is not None:
                    segments.append(segment)
        s = self.sampling(opts, "story_temperature")
        return Output(
            segments=segments,
            seed=seed,
            model=self.name,
            timings=timer.timings,
            settings=self._settings(s, opts, [seed]),
        )

    def stream(
        self,
        segments: Sequence[Segment],
        options: Options | None = None,
        *,
        seed: int | None = None,
        plan: Plan | None = None,
        on_phase: Callable[[int, str, list[torch.Generator]], None] | None = None,
    ) -> Iterator[tuple[int, Segment | None]]:
        """Continue ``segments`` and yield ``(0, segment)`` as each segment is ready (None
        at the end of the document). ``plan`` defaults to free interleaving."""
        opts = (options or Options()).validate()
        self.check_options(opts)
        seed = resolve_seed(seed if seed is not None else opts.seed)
        s = self.sampling(opts, "story_temperature")
        max_new = opts.max_new_tokens or self.defaults["max_new_tokens"]
        if plan is None:
            plan = Plan(
                ["free"],
                max_new_tokens=max_new,
                max_images=1 if opts.max_images is None else opts.max_images,
            )
        row = self.prompt(list(segments))
        yield from self.run([row], plan, s, [seed], steps=opts.steps, on_phase=on_phase)

    def story(
        self,
        prompt: str | Sequence[Segment],
        scenes: int,
        seed: int,
        options: Options | None = None,
        *,
        candidates: int = 1,
    ) -> list[Segment]:
        """A story of ``scenes`` scenes after ``prompt`` (``anygen.pipelines.story``), as
        its segments, the prompt first; ``candidates`` > 1: the opening picture is the best
        of that many."""
        from anygen.pipelines.story import generate_story

        return generate_story(
            self, prompt, scenes, options, seed=seed, candidates=candidates
        ).segments

    # ------------------------------------------------------------------ image -> text

    def _texts(
        self, prompts: list[Prompt], opts: Options, *, seeds: Sequence[int] | None = None
    ) -> list[str]:
        """One text per prompt; row i draws from ``seeds[i]``, by default the seed + i."""
        s = self.sampling(opts, "text_temperature")
        if s.temperature == 0 and (opts.top_k is not None or opts.top_p is not None):
            raise UserInputError(
                "top-k and top-p shape sampling, and text is greedy unless a temperature above "
                "0 is given: add --temperature"
            )
        max_new = opts.max_new_tokens or self.defaults["max_new_tokens"]
        if seeds is None:
            seed = resolve_seed(opts.seed if opts.seed is not None else 0)
            seeds = [seed + i for i in range(len(prompts))]
        generators = [make_generator(x, self.device) for x in seeds]
        texts = [""] * len(prompts)
        plan = Plan(["text"], max_new_tokens=max_new)
        for row, kind, value in decode_stream(self.transformer, prompts, plan, s, generators):
            if kind == "text":
                texts[row] = self.decode_text(value)
        return texts

    def caption(self, images: Sequence[Image.Image], options: Options | None = None) -> list[str]:
        """One caption per image (greedy by default): the answer to the question the
        training documents ask of it, ``CAPTION_QUESTION``."""
        opts = (options or Options()).validate()
        _check_images(images)
        return self._texts(self.image_prompts(images, [CAPTION_QUESTION] * len(images)), opts)

    def best_captions(
        self, images: Sequence[Image.Image], candidates: int, options: Options | None = None
    ) -> list[tuple[str, int, float]]:
        """Each image's caption, the best of ``candidates``: the plain caption (``caption``)
        and ``candidates - 1`` sampled ones, kept by how likely the model finds the image's
        codes after each, log p(codes | caption) (a noisy channel: the text-to-image
        direction checks the captioner). Returns (caption, kept candidate, score) per
        image; equals go to the earlier candidate, so the plain caption wins a tie.

        The sampled candidates draw at the temperature option where it is given, else at
        the model's ``caption_candidate_temperature``; candidate j > 0 of image i draws
        from ``rerank.candidate_seeds(seed + i, candidates)[j]``."""
        from anygen.pipelines.rerank import candidate_seeds

        opts = (options or Options()).validate()
        _check_images(images)
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise UserInputError(f"candidates must be a whole number >= 1, got {candidates!r}")
        c = self.config
        if c.continuous:
            raise UserInputError(
                f"{self.name!r} regresses its images (continuous): they have no likelihood "
                "to rank captions by"
            )
        temperature = opts.temperature
        if temperature is None:
            temperature = self.defaults["caption_candidate_temperature"]
        if candidates > 1 and temperature <= 0:
            raise UserInputError(
                "ranking captions needs candidates that differ: a temperature above 0"
            )
        encoded = self.encode_images(images)  # once: the prompts' images and the scored codes
        prompts = [
            self.prompt([image, CAPTION_QUESTION], encoded=[x])
            for image, x in zip(images, encoded, strict=True)
        ]
        plain = opts  # the greedy caption takes no top-k / top-p: they shape the sampled ones
        if self.sampling(opts, "text_temperature").temperature == 0:
            plain = dataclasses.replace(opts, top_k=None, top_p=None)
        texts = [self._texts(prompts, plain)]  # [candidate j][image i]
        seed = resolve_seed(opts.seed if opts.seed is not None else 0)
        seeds = [candidate_seeds(seed + i, candidates) for i in range(len(images))]
        sampled = dataclasses.replace(opts, temperature=temperature)
        for j in range(1, candidates):  # one candidate of every image at a time
            texts.append(self._texts(prompts, sampled, seeds=[s[j] for s in seeds]))
        codes = [(x + c.image_offset).tolist() for x in encoded]
        rows = [
            Prompt([c.bos_id, *self.text_ids(t), c.boi_id, *codes[i]])
            for per_image in texts
            for i, t in enumerate(per_image)
        ]
        scores = log_likelihood(self.transformer, rows, [c.image_tokens] * len(rows))
        scores = scores.view(candidates, len(images))
        out = []
        for i in range(len(images)):
            j = max(range(candidates), key=lambda j: (float(scores[j, i]), -j))
            out.append((texts[j][i], j, round(float(scores[j, i]), 4)))
        return out

    def answer(
        self,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        options: Options | None = None,
    ) -> list[str]:
        """One short answer per (image, question)."""
        opts = (options or Options()).validate()
        _check_images(images)
        if len(images) != len(questions):
            raise UserInputError(f"{len(images)} images but {len(questions)} questions")
        for q in questions:
            if not q.strip():
                raise UserInputError("a question is empty")
        return self._texts(self.image_prompts(images, [question_text(q) for q in questions]), opts)

    # ------------------------------------------------------------------ image <-> text fit

    def score(
        self, images: Sequence[Image.Image], texts: Sequence[str], *, by: str = "caption"
    ) -> list[float]:
        """How well each image fits its text, in nats (higher: better), for reranking.

        ``by="caption"``: log p(text | image), the model reading the image and writing the
        text as its caption (Parti reranks with a captioner, CoCa). ``by="pmi"`` (discrete
        models): log p(image | text) - log p(image), the image's codes written after the
        text against after no text: the evidence the text adds, as classifier-free guidance
        uses it. Scores compare images of one text; across texts they are not calibrated.
        """
        _check_images(images)
        if len(images) != len(texts):
            raise UserInputError(f"{len(images)} images but {len(texts)} texts")
        for t in texts:
            check_prompt(t)
        c = self.config
        if by == "caption":
            targets = [[*self.text_ids(t), c.eos_id] for t in texts]
            rows = self.image_prompts(images, [CAPTION_QUESTION] * len(images), ends=targets)
            return log_likelihood(self.transformer, rows, [len(t) for t in targets]).tolist()
        if by != "pmi":
            raise UserInputError(f"unknown score {by!r}; choose one of {', '.join(SCORES)}")
        if c.continuous:
            raise UserInputError(
                f"{self.name!r} regresses its images (continuous): they have no likelihood "
                "to score by pmi; score by caption"
            )
        codes = [(x + c.image_offset).tolist() for x in self.encode_images(images)]
        with_text = [
            Prompt([c.bos_id, *self.text_ids(t), c.boi_id, *x])
            for t, x in zip(texts, codes, strict=True)
        ]
        without = [Prompt([c.bos_id, c.boi_id, *x]) for x in codes]
        n = [c.image_tokens] * len(codes)
        return (
            log_likelihood(self.transformer, with_text, n)
            - log_likelihood(self.transformer, without, n)
        ).tolist()

    # ------------------------------------------------------------------ save / load

    def save_pretrained(
        self,
        directory: str | Path,
        *,
        card: str | None = None,
        dtype: torch.dtype | None = None,
        tokenizer_ref: str | None = None,
        images_ref: str | None = None,
        extra_files: dict[str, str] | None = None,
    ) -> Path:
        """Write the model directory atomically. ``tokenizer_ref`` / ``images_ref`` (a
        bundled name or hub id) are recorded instead of copying that part in."""
        directory = Path(directory)
        images_key = "visual" if self.config.continuous else "image_tokenizer"
        with atomic_directory(directory) as tmp:
            self.transformer.save_pretrained(tmp, dtype=dtype)
            if tokenizer_ref is None:
                self.tokenizer.save_pretrained(tmp / "tokenizer")
            if images_ref is None:
                self.images.save_pretrained(tmp / images_key, dtype=dtype)
            meta = {
                "family": self.family,
                "tokenizer": tokenizer_ref or "tokenizer",
                images_key: images_ref or images_key,
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
    ) -> Fusion:
        path = Path(path)
        meta = read_model_meta(path, "a saved fusion model")
        transformer = FusionTransformer.from_pretrained(path)
        tokenizer = load_text_tokenizer(part_location(path, meta, "tokenizer"))
        if transformer.config.continuous:
            images = load_visual_codec(part_location(path, meta, "visual"))
        else:
            images = load_image_tokenizer(part_location(path, meta, "image_tokenizer"))
        defaults = {k: v for k, v in meta.items() if k not in PART_KEYS}
        return cls(
            transformer,
            tokenizer,
            images,
            name=name or path.name,
            defaults=defaults,
            device=device,
            dtype=dtype,
        )


def _check_images(images: Sequence[Image.Image]) -> None:
    if not images:
        raise UserInputError("no images given")
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise UserInputError(f"image {i} is a {type(im).__name__}, not a PIL image")
