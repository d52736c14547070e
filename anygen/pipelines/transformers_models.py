"""transformers models behind anygen's interface: image generators and image readers.

| class | transformers model | generate (text -> image) | caption / answer (image -> text) |
|---|---|---|---|
| ``Janus`` | ``JanusForConditionalGeneration`` | ``generate(generation_mode="image")``, then ``decode_image_tokens`` | yes |
| ``Emu3`` | ``Emu3ForConditionalGeneration`` | ``generate`` with a prefix constraint, then ``decode_image_tokens(image_tokens=, height=, width=)`` | yes |
| ``Chameleon`` | ``ChameleonForConditionalGeneration`` | refused: its VQ model is encoder-only in transformers and image-token logits are masked | yes |
| ``VisionLanguageModel`` | any ``AutoModelForImageTextToText`` | refused | yes |

Decoding uses the models' own ``generate``; anygen adds one logits processor,
``SeededSampling``, as the last step: it applies guidance where the model batches it,
temperature / top-k / top-p, and draws each row's token with that row's own
``torch.Generator`` (image i from seed + i), then leaves only the drawn token finite so the
greedy step of ``generate`` takes exactly it. Randomness thus never touches torch's
global RNG, and a batch equals its rows run alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from anygen.data.datasets import tensor_to_images
from anygen.errors import CheckpointError, UserInputError, load_errors
from anygen.hub import read_json_object
from anygen.pipelines.base import (
    DIFFUSION_SETTINGS,
    EDIT_SETTINGS,
    Options,
    Output,
    TextToImage,
    Timer,
    check_batch,
    check_negative_code_guidance,
    check_prompt,
    make_generator,
    resolve_seed,
)
from anygen.pipelines.runtime import Runtime
from anygen.sampling import guide, process_logits, sample_tokens

log = logging.getLogger(__name__)

DEFAULT_CAPTION_QUESTION = "Describe this image in one sentence."
DEFAULT_MAX_NEW_TOKENS = 64


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def seeded_sampling(
    generators: Sequence[torch.Generator],
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    guidance: float | None = None,
    progress=None,
):
    """A transformers ``LogitsProcessor`` (built lazily: transformers is imported here only)
    that draws the next token of each row with its own generator.

    ``guidance`` set: the scores arrive as (2B, V), conditional rows first (Janus batches
    guidance that way) and leave as guided (B, V). ``progress`` (a tqdm bar) advances by
    one at each token."""
    from transformers import LogitsProcessor

    class SeededSampling(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor):
            if guidance is not None:
                cond, uncond = scores.float().chunk(2)  # (B, V) each
                scores = guide(cond, uncond, guidance)
            logits = process_logits(scores, temperature, top_k, top_p)  # (B, V)
            tokens = sample_tokens(logits, list(generators), greedy=temperature == 0)  # (B,)
            out = torch.full_like(logits, float("-inf"))
            if progress is not None:
                progress.update(1)
            return out.scatter_(1, tokens[:, None], 0.0)

    return SeededSampling()


class TransformersGenerator(TextToImage):
    """What the transformers families share: loading, text decoding, caption / answer."""

    family = "transformers"
    model_class_name = "AutoModelForImageTextToText"
    can_generate_images = False
    cannot_generate_reason = "it reads images but does not draw them"

    def __init__(
        self,
        model,
        processor,
        *,
        name: str,
        device: torch.device,
        dtype: torch.dtype,
        defaults: dict | None = None,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # a decoder-only model continues the prompt, so its batches pad on the left; an
        # encoder-decoder model's encoder reads the prompt, padded on the right as it trained
        encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.tokenizer.padding_side = "right" if encoder_decoder else "left"
        self.name = name
        self.device = torch.device(device)
        self.dtype = dtype
        self.defaults = dict(defaults or {})

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        name: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        runtime: Runtime | None = None,
        defaults: dict | None = None,
    ) -> TransformersGenerator:
        """Model and processor from safetensors in ``path``, with no remote code."""
        import transformers

        path = Path(path)
        name = name or path.name
        runtime = runtime or Runtime()
        runtime.refuse_for(name, cls.family)
        klass = getattr(transformers, cls.model_class_name)
        kwargs = {"dtype": dtype, "use_safetensors": True}
        implementation = runtime.transformers_attn_implementation()
        if implementation is not None:
            kwargs["attn_implementation"] = implementation
        try:
            model = klass.from_pretrained(path, **kwargs)
            processor = transformers.AutoProcessor.from_pretrained(path)
        except load_errors() as e:
            raise CheckpointError(f"cannot load {name} from {path}: {_first_line(e)}") from None
        if not hasattr(processor, "tokenizer"):
            raise CheckpointError(
                f"{path} has no processor with a tokenizer (processor_config.json)"
            )
        model.to(device)
        return cls(model, processor, name=name, device=device, dtype=dtype, defaults=defaults)

    # ------------------------------------------------------------------ text to image

    def generate_batch(
        self, prompts: list[str], seeds: list[int], options: Options | None = None
    ) -> Output:
        raise UserInputError(
            f"{self.name} ({type(self.model).__name__}) cannot generate images: "
            f"{self.cannot_generate_reason}; use `anygen caption` or `anygen ask`"
        )

    def _image_sampling(self, opts: Options) -> tuple[float, int | None, float | None, float]:
        """(temperature, top-k, top-p, guidance) for image tokens; diffusion settings refused."""
        opts.refuse(
            (*DIFFUSION_SETTINGS, *EDIT_SETTINGS, "max_new_tokens"),
            f"means nothing to {self.name!r}: it draws image tokens one by one; "
            "use --guidance, --temperature, --top-k and --top-p",
        )
        d = self.defaults
        temperature = (
            opts.temperature if opts.temperature is not None else d.get("temperature", 1.0)
        )
        top_k = opts.top_k if opts.top_k is not None else d.get("top_k")
        top_p = opts.top_p if opts.top_p is not None else d.get("top_p")
        guidance = (
            opts.guidance_scale if opts.guidance_scale is not None else d.get("guidance_scale", 5.0)
        )
        return float(temperature), top_k, top_p, float(guidance)

    # ------------------------------------------------------------------ image to text

    def question_prompt(self, question: str) -> str:
        """One user turn holding an image and ``question``, through the chat template."""
        template = getattr(self.processor, "chat_template", None)
        if not template:
            raise CheckpointError(
                f"{self.name} has no chat template (chat_template.jinja or in "
                "processor_config.json), so anygen cannot place the image and the question"
            )
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": question}],
            }
        ]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def processor_inputs(self, images: list[Image.Image], prompts: list[str]) -> dict:
        return self.processor(images=images, text=prompts, padding=True, return_tensors="pt")

    def answer(
        self,
        images: Sequence[Image.Image],
        questions: Sequence[str],
        options: Options | None = None,
    ) -> list[str]:
        """One answer per (image, question), decoded in one batch; greedy unless
        ``options.temperature`` > 0, then row i samples with seed + i."""
        images, questions = list(images), list(questions)
        if len(images) != len(questions):
            raise UserInputError(f"{len(images)} images but {len(questions)} questions")
        if not images:
            raise UserInputError("no images given")
        for q in questions:
            check_prompt(q)
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise UserInputError(f"image {i} is a {type(image).__name__}, not a PIL image")
        opts = (options or Options()).validate()
        opts.refuse(
            (
                *DIFFUSION_SETTINGS,
                "guidance_scale",
                "negative_prompt",
                "width",
                "height",
                *EDIT_SETTINGS,
            ),
            f"means nothing when {self.name} writes text",
        )
        if opts.num_images != 1:
            raise UserInputError("number of images applies to image generation, not to text")
        if opts.callback is not None:
            raise UserInputError(f"{self.name} takes no step callback when it writes text")
        temperature = float(opts.temperature or 0.0)
        if temperature == 0 and (opts.top_k is not None or opts.top_p is not None):
            raise UserInputError(
                "top-k and top-p shape sampling, and text is greedy unless a temperature above "
                "0 is given: add --temperature"
            )
        seed = resolve_seed(opts.seed)
        generators = [make_generator(seed + i, self.device) for i in range(len(images))]
        prompts = [self.question_prompt(q) for q in questions]
        inputs = self.processor_inputs([im.convert("RGB") for im in images], prompts)
        inputs = self._to_device(inputs)
        prompt_length = inputs["input_ids"].shape[1]
        max_new = opts.max_new_tokens or self.defaults.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        sampler = seeded_sampling(generators, temperature, opts.top_k, opts.top_p)
        with torch.no_grad():
            out = self._generate_text(
                **inputs,
                generation_config=self._generation_config(
                    max_new_tokens=int(max_new), **self._text_overrides()
                ),
                logits_processor=self._processor_list(sampler),
            )
        # a decoder-only model returns the prompt and then the answer; an encoder-decoder
        # one (Florence-2, T5Gemma 2) returns its decoder's tokens alone, from the start token
        new = out if self.model.config.is_encoder_decoder else out[:, prompt_length:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [t.strip() for t in texts]

    def caption(self, images: Sequence[Image.Image], options: Options | None = None) -> list[str]:
        """A short description of each image."""
        question = self.defaults.get("caption_question", DEFAULT_CAPTION_QUESTION)
        return self.answer(images, [question] * len(list(images)), options)

    # ------------------------------------------------------------------ helpers

    def _generate_text(self, **kwargs) -> torch.Tensor:
        return self.model.generate(**kwargs)

    def _text_overrides(self) -> dict:
        """Generation settings a family needs when it writes text (captions, answers)."""
        return {}

    def _generation_config(self, **overrides):
        """A clean config: greedy at the transformers level (``SeededSampling`` draws), the
        checkpoint's special token ids, nothing else carried over (no guidance, repetition
        penalty or sampling defaults from its generation_config.json)."""
        from transformers import GenerationConfig

        tok = self.tokenizer
        saved = self.model.generation_config
        eos = saved.eos_token_id if saved.eos_token_id is not None else tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else saved.pad_token_id
        if pad is None:
            pad = eos[0] if isinstance(eos, list) else eos
        bos = saved.bos_token_id if saved.bos_token_id is not None else tok.bos_token_id
        # generate() fills every field left None from the checkpoint's generation_config
        # (transformers 5: `update(..., defaults_only=True)`), so the processors that act on
        # greedy decoding are switched off by value: Janus checkpoints save guidance_scale 5,
        # which would guide every caption against a prompt-less row
        neutral = {
            "guidance_scale": 1.0,
            "repetition_penalty": 1.0,
            "encoder_repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "encoder_no_repeat_ngram_size": 0,
            "min_length": 0,
            "min_new_tokens": 0,
            "suppress_tokens": [],
            "begin_suppress_tokens": [],
        }
        ids = {"eos_token_id": eos, "pad_token_id": pad, "bos_token_id": bos}
        return GenerationConfig(do_sample=False, num_beams=1, **{**ids, **neutral, **overrides})

    @staticmethod
    def _processor_list(*processors):
        from transformers import LogitsProcessorList

        return LogitsProcessorList(list(processors))

    def _to_device(self, inputs) -> dict:
        out = {}
        for key, value in dict(inputs).items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device)
                if value.is_floating_point():
                    value = value.to(self.dtype)
            out[key] = value
        return out

    def _check_size(self, opts: Options, width: int, height: int) -> None:
        for label, asked, native in (("width", opts.width, width), ("height", opts.height, height)):
            if asked is not None and asked != native:
                raise UserInputError(
                    f"{self.name} draws {width} x {height} images only; {label} {asked} "
                    "cannot be honoured"
                )


# ---------------------------------------------------------------------------------- Janus


class Janus(TransformersGenerator):
    """Janus / Janus-Pro: text to image with its generation head over VQ codes, and image
    understanding with its SigLIP encoder, in one model.

    An image is exactly ``vision_config.num_image_tokens`` codes (576 = 24 x 24 for
    Janus-Pro), drawn with classifier-free guidance: ``generate`` doubles the batch with
    unconditional rows (the prompt replaced by padding) and ``SeededSampling`` combines
    them; the VQ decoder renders the codes at ``num_patches`` x its upsampling factor."""

    family = "janus"
    model_class_name = "JanusForConditionalGeneration"
    can_generate_images = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        vq = self.model.model.vqmodel.config
        vision = self.model.config.vision_config
        self.num_image_tokens = int(vision.num_image_tokens)
        grid = int(vq.num_patches)
        if grid * grid != self.num_image_tokens:
            raise CheckpointError(
                f"{self.name}: vision_config.num_image_tokens is {self.num_image_tokens} but the "
                f"VQ decoder renders a {grid} x {grid} grid"
            )
        self.image_size = grid * 2 ** (len(vq.channel_multiplier) - 1)
        self.defaults.setdefault("guidance_scale", 5.0)
        self.defaults.setdefault("temperature", 1.0)

    def image_prompt(self, prompt: str) -> str:
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return prompt

    def generate_batch(
        self, prompts: list[str], seeds: list[int], options: Options | None = None
    ) -> Output:
        opts = check_batch(prompts, seeds, options)
        if opts.callback is not None:  # the bar counts tokens; no per-step hook is wired
            raise UserInputError(f"{self.name} takes no step callback")
        if opts.negative_prompt is not None:
            raise UserInputError(
                f"{self.name} takes no negative prompt: Janus' unconditional rows are the "
                "prompt replaced by padding"
            )
        self._check_size(opts, self.image_size, self.image_size)
        temperature, top_k, top_p, guidance = self._image_sampling(opts)
        generators = [make_generator(s, self.device) for s in seeds]
        timer = Timer()
        with timer("tokens"):
            tokens = self.image_tokens(
                prompts, generators, temperature, top_k, top_p, guidance, progress=opts.progress
            )
        with timer("decode"), torch.no_grad():
            pixels = self.model.decode_image_tokens(tokens)  # (B, H, W, 3) in [-1, 1]
            images = tensor_to_images(pixels.permute(0, 3, 1, 2).float())
        settings = {
            "guidance_scale": guidance,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "width": self.image_size,
            "height": self.image_size,
            "image_tokens": int(tokens.shape[1]),
            "seeds": list(seeds),
        }
        return Output(
            segments=images,
            seed=seeds[0],
            model=self.name,
            timings=timer.timings,
            settings=settings,
        )

    def image_tokens(
        self,
        prompts: list[str],
        generators: list[torch.Generator],
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        guidance: float,
        *,
        progress: bool = False,
    ) -> torch.Tensor:
        """(B, num_image_tokens) VQ codes for ``prompts``; ``progress``: a bar over them."""
        texts = [self.image_prompt(p) for p in prompts]
        inputs = self.processor(
            text=texts, generation_mode="image", padding=True, return_tensors="pt"
        )
        inputs = self._to_device(inputs)
        boi = self.tokenizer.convert_tokens_to_ids(self.processor.image_start_token)
        overrides = {}
        pad = self.model.generation_config.pad_token_id
        if pad is not None:
            # the unconditional rows are the prompt replaced by this id: converted Janus
            # checkpoints save the original model's <｜▁pad▁｜> here, not the tokenizer's pad
            overrides["pad_token_id"] = pad
        config = self._generation_config(
            # 1: Janus adds no guidance processor of its own; SeededSampling guides
            guidance_scale=1.0,
            generation_kwargs={"boi_token_id": boi},
            **overrides,
        )
        bar = tqdm(
            total=self.num_image_tokens,
            desc=f"{self.name} image tokens",
            disable=not progress,
            leave=False,
        )
        sampler = seeded_sampling(
            generators, temperature, top_k, top_p, guidance=guidance, progress=bar
        )
        with bar, torch.no_grad():
            tokens = self.model.generate(
                **inputs,
                generation_mode="image",
                generation_config=config,
                logits_processor=self._processor_list(sampler),
            )
        if tokens.shape != (len(prompts), self.num_image_tokens):
            raise RuntimeError(
                f"Janus returned {tuple(tokens.shape)} image tokens, expected "
                f"({len(prompts)}, {self.num_image_tokens})"
            )
        return tokens

    def question_prompt(self, question: str) -> str:
        if getattr(self.processor, "chat_template", None):
            return super().question_prompt(question)
        # Janus' conversation format (deepseek-ai/Janus), for processors without a template
        return f"<|User|>: {self.processor.image_token}\n{question}\n\n<|Assistant|>:"

    def _generate_text(self, **kwargs) -> torch.Tensor:
        # JanusForConditionalGeneration.generate in text mode drops `logits_processor`
        # (transformers 5.23); its text mode is GenerationMixin.generate, called directly.
        from transformers import GenerationMixin

        return GenerationMixin.generate(self.model, **kwargs)


# ---------------------------------------------------------------------------------- Emu3


class Emu3(TransformersGenerator):
    """Emu3: one decoder over text and VQ image tokens.

    An image of H x W pixels is ``h = H / 8`` rows of ``w = W / 8`` visual tokens, each row
    closed by an end-of-line token, then end-of-frame, end-of-image and end-of-sequence:
    exactly ``h * (w + 1) + 3`` new tokens. A prefix constraint allows only visual tokens
    inside the grid and the fixed tokens at their places. Guidance is transformers'
    unbatched classifier-free guidance against the negative prompt (empty by default),
    which carries the same image header as the prompt."""

    family = "emu3"
    model_class_name = "Emu3ForConditionalGeneration"
    can_generate_images = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        vq = self.model.model.vqmodel
        self.factor = int(vq.spatial_scale_factor)
        ratio = int(getattr(self.processor, "downsample_ratio", self.factor))
        if ratio != self.factor:
            raise CheckpointError(
                f"{self.name}: the processor places {ratio} x {ratio} pixels per token but the "
                f"VQ model decodes {self.factor} x {self.factor}"
            )
        mapping = self.model.vocabulary_mapping
        tok = self.tokenizer
        self.visual_tokens = torch.tensor(mapping.image_tokens)  # ids of the codebook entries
        self.eol = mapping.eol_token_id
        self.eof = tok.convert_tokens_to_ids(self.processor.eof_token)
        self.eoi = tok.convert_tokens_to_ids(self.processor.image_end_token)
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.defaults.setdefault("guidance_scale", 3.0)
        self.defaults.setdefault("temperature", 1.0)
        side = int(round(getattr(self.processor, "image_area", 720 * 720) ** 0.5))
        self.defaults.setdefault("width", side - side % self.factor)
        self.defaults.setdefault("height", side - side % self.factor)

    def _text_overrides(self) -> dict:
        # codebook tokens are never words: without this an Emu3-Gen checkpoint asked for a
        # caption writes image codes into it
        return {"suppress_tokens": self.visual_tokens.tolist()}

    def token_count(self, rows: int, cols: int) -> int:
        """New tokens for a rows x cols grid: rows of cols + end-of-line, then EOF, EOI, EOS."""
        return rows * (cols + 1) + 3

    def _constraint(self, prompt_length: int, rows: int, cols: int):
        """``prefix_allowed_tokens_fn`` for a rows x cols grid: token ids allowed next.
        Tensors on the model's device, built once (the codebook has 32,768 entries)."""
        grid = rows * (cols + 1)
        visual = self.visual_tokens.to(self.device)

        def ids(*tokens: int) -> torch.Tensor:
            return torch.tensor(tokens, device=self.device)

        eol, after = ids(self.eol), [ids(self.eof), ids(self.eoi), ids(self.eos)]
        pad = ids(self.pad)

        def allowed(batch_id: int, input_ids: torch.Tensor) -> torch.Tensor:
            k = input_ids.shape[0] - prompt_length  # tokens generated so far
            if k < grid:
                return eol if (k + 1) % (cols + 1) == 0 else visual
            return after[k - grid] if k - grid < len(after) else pad

        return allowed

    def _image_inputs(self, texts: list[str], width: int, height: int) -> dict:
        inputs = self.processor(
            text=texts,
            return_for_image_generation=True,
            ratio=f"{width}:{height}",
            image_area=width * height,
            padding=True,
            return_tensors="pt",
        )
        rows, cols = (int(v) for v in inputs.pop("image_sizes")[0])
        if (rows * self.factor, cols * self.factor) != (height, width):
            raise UserInputError(f"{width} x {height} does not map onto a token grid")
        return self._to_device(inputs)

    def generate_batch(
        self, prompts: list[str], seeds: list[int], options: Options | None = None
    ) -> Output:
        opts = check_batch(prompts, seeds, options)
        if opts.callback is not None:  # the bar counts tokens; no per-step hook is wired
            raise UserInputError(f"{self.name} takes no step callback")
        width = opts.width or self.defaults["width"]
        height = opts.height or self.defaults["height"]
        for label, value in (("width", width), ("height", height)):
            if value % self.factor:
                raise UserInputError(
                    f"{label} {value} is not a multiple of {self.factor}, the pixels per token"
                )
        temperature, top_k, top_p, guidance = self._image_sampling(opts)
        check_negative_code_guidance(opts.negative_prompt, guidance)
        rows, cols = height // self.factor, width // self.factor
        inputs = self._image_inputs(list(prompts), width, height)
        prompt_length = inputs["input_ids"].shape[1]
        count = self.token_count(rows, cols)
        limit = getattr(
            getattr(self.model.config, "text_config", None), "max_position_embeddings", None
        )
        if limit is not None and prompt_length + count > limit:
            raise UserInputError(
                f"{width} x {height} needs {count} image tokens after a {prompt_length}-token "
                f"prompt, beyond the {limit} positions {self.name} was trained on; ask for a "
                "smaller size"
            )
        extra = {}
        if guidance != 1.0:
            negative = self._image_inputs(
                [opts.negative_prompt or ""] * len(prompts), width, height
            )
            extra = {
                "negative_prompt_ids": negative["input_ids"],
                "negative_prompt_attention_mask": negative["attention_mask"],
            }
        # exactly `count` tokens: the constraint ends the grid with EOS at the last one
        config = self._generation_config(max_new_tokens=count, guidance_scale=guidance)
        generators = [make_generator(s, self.device) for s in seeds]
        bar = tqdm(
            total=count, desc=f"{self.name} image tokens", disable=not opts.progress, leave=False
        )
        sampler = seeded_sampling(generators, temperature, top_k, top_p, progress=bar)
        timer = Timer()
        with timer("tokens"), bar, torch.no_grad():
            out = self.model.generate(
                **inputs,
                **extra,
                generation_config=config,
                prefix_allowed_tokens_fn=self._constraint(prompt_length, rows, cols),
                logits_processor=self._processor_list(sampler),
            )
        tokens = out[:, prompt_length:]  # (B, rows * (cols + 1) + 3)
        if tokens.shape[1] != count:
            raise RuntimeError(f"Emu3 returned {tokens.shape[1]} image tokens, expected {count}")
        with timer("decode"), torch.no_grad():
            pixels = self.model.decode_image_tokens(image_tokens=tokens, height=rows, width=cols)
            images = tensor_to_images(pixels.float())  # (B, 3, H, W) in [-1, 1]
        settings = {
            "guidance_scale": guidance,
            "negative_prompt": opts.negative_prompt,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "width": width,
            "height": height,
            "image_tokens": count,
            "seeds": list(seeds),
        }
        return Output(
            segments=images,
            seed=seeds[0],
            model=self.name,
            timings=timer.timings,
            settings=settings,
        )

    def question_prompt(self, question: str) -> str:
        if getattr(self.processor, "chat_template", None):
            return super().question_prompt(question)
        return f"USER: {self.processor.image_token}{question} ASSISTANT:"  # Emu3-Chat format


# ---------------------------------------------------------------------------------- Chameleon


class Chameleon(TransformersGenerator):
    """Chameleon reads images (VQ codes in its vocabulary) and writes text."""

    family = "chameleon"
    model_class_name = "ChameleonForConditionalGeneration"
    cannot_generate_reason = (
        "transformers' ChameleonVQVAE has no decoder and the model masks image-token logits, "
        "so it reads images but cannot draw them"
    )

    def question_prompt(self, question: str) -> str:
        if getattr(self.processor, "chat_template", None):
            return super().question_prompt(question)
        return f"{question}{self.processor.image_token}"

    def processor_inputs(self, images: list[Image.Image], prompts: list[str]) -> dict:
        inputs = self.processor(images=images, text=prompts, padding=True, return_tensors="pt")
        return inputs


# ---------------------------------------------------------------------------------- any VLM


class VisionLanguageModel(TransformersGenerator):
    """Any ``AutoModelForImageTextToText`` model with a chat template (LLaVA, SmolVLM,
    Qwen2-VL, PaliGemma, ...), or an encoder-decoder one whose processor places the image
    itself (Florence-2): captions and answers."""

    family = "vlm"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.model.config.model_type == "florence2":
            # Florence-2 answers task prompts; its processor words <CAPTION> for the model
            self.defaults.setdefault("caption_question", "<CAPTION>")

    def question_prompt(self, question: str) -> str:
        if self.model.config.is_encoder_decoder and not getattr(
            self.processor, "chat_template", None
        ):
            # encoder-decoder processors (Florence-2's) place the image themselves and take
            # the question as it is; they load no chat template
            return question
        return super().question_prompt(question)

    def processor_inputs(self, images: list[Image.Image], prompts: list[str]) -> dict:
        # one image per prompt, nested as processors of multi-image models expect
        return self.processor(
            images=[[im] for im in images], text=prompts, padding=True, return_tensors="pt"
        )


FAMILIES: dict[str, type[TransformersGenerator]] = {
    "janus": Janus,
    "emu3": Emu3,
    "chameleon": Chameleon,
}


def transformers_family(config_path: Path) -> type[TransformersGenerator] | None:
    """The class for a transformers checkpoint's ``config.json`` (None: not one we run)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        config = read_json_object(config_path)
    except (CheckpointError, OSError):
        return None
    model_type = config.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return VisionLanguageModel
    return None
