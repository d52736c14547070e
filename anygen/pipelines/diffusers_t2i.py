"""Any diffusers text-to-image or image-editing pipeline behind anygen's interface.

``DiffusersTextToImage`` loads the pipeline class that ``model_index.json`` names (SDXL,
SD3, PixArt, Flux, Sana, ... for text to image; img2img and InstructPix2Pix pipelines for
editing) and maps ``Options`` onto its ``__call__``:

- seed -> one ``torch.Generator`` per image (image i from seed + i), so any one image can
  be made again alone;
- steps, guidance, negative prompt, size, number of images, scheduler -> the pipeline's
  own arguments, each only where the pipeline honours it: an option it cannot honour is a
  ``UserInputError`` that says so, never dropped;
- width and height must be multiples of the pipeline's latent grid (VAE factor times
  patch size, and Flux's 2 x 2 packing): diffusers would otherwise resize silently.

Loading imports only diffusers and transformers classes (never code from a repo), and
weights from safetensors only. The Stable Diffusion 1.x/2.x family runs on
``LatentDiffusion`` instead, whose loop is anygen's own; editing with it comes here.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
from pathlib import Path

import torch
from PIL import Image

from anygen.errors import CheckpointError, ModelNotFoundError, UserInputError, load_errors
from anygen.hub import read_json_object
from anygen.pipelines.base import (
    TOKEN_SETTINGS,
    Options,
    Output,
    TextToImage,
    Timer,
    check_batch,
    check_negative_guidance,
    check_prompt,
    make_generator,
    resolve_seed,
)
from anygen.pipelines.runtime import Runtime, configure_pipeline

log = logging.getLogger(__name__)

COMPONENT_LIBRARIES = ("diffusers", "transformers")
# Pipelines that need a control image or mask are not text-to-image for anygen's purpose.
_NEEDS_MORE_INPUT = ("ControlNet", "Control", "Inpaint", "PAG")
INSTRUCTION_EDITORS = (
    "StableDiffusionInstructPix2PixPipeline",
    "StableDiffusionXLInstructPix2PixPipeline",
)


def text_to_image_classes() -> set[str]:
    """Pipeline class names diffusers itself maps to text-to-image (its AutoPipeline
    tables), less those needing more than a prompt."""
    from diffusers.pipelines.auto_pipeline import AUTO_TEXT2IMAGE_PIPELINES_MAPPING

    return {
        k.__name__
        for k in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.values()
        if not any(word in k.__name__ for word in _NEEDS_MORE_INPUT)
    }


def image_edit_classes() -> set[str]:
    """Pipeline class names that turn an image and a prompt into an image."""
    from diffusers.pipelines.auto_pipeline import AUTO_IMAGE2IMAGE_PIPELINES_MAPPING

    names = {
        k.__name__
        for k in AUTO_IMAGE2IMAGE_PIPELINES_MAPPING.values()
        if not any(word in k.__name__ for word in _NEEDS_MORE_INPUT)
    }
    return names | set(INSTRUCTION_EDITORS)


def read_model_index(path: Path) -> dict:
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelNotFoundError(f"{path} is not a diffusers pipeline (no model_index.json)")
    meta = read_json_object(index)
    if not isinstance(meta.get("_class_name"), str):
        raise CheckpointError(f"{index} names no pipeline class (_class_name)")
    return meta


def _check_components(path: Path, meta: dict) -> None:
    """Every component must come from diffusers or transformers (diffusers' own
    per-pipeline modules, e.g. ``stable_diffusion``, count as diffusers)."""
    for key, spec in meta.items():
        if key.startswith("_") or not isinstance(spec, list):
            continue
        if len(spec) != 2:
            raise CheckpointError(f"{path / 'model_index.json'}: component {key!r} is {spec!r}")
        library = spec[0]
        if library is None or library in COMPONENT_LIBRARIES:
            continue
        if importlib.util.find_spec(f"diffusers.pipelines.{library}") is not None:
            continue
        raise CheckpointError(
            f"{path / 'model_index.json'}: component {key!r} comes from {library!r}; anygen "
            f"loads only {' and '.join(COMPONENT_LIBRARIES)} classes (no remote code)"
        )


def load_diffusers_pipeline(path: Path, dtype: torch.dtype):
    """The pipeline ``model_index.json`` names, from safetensors, without safety checker."""
    import diffusers

    meta = read_model_index(path)
    class_name = meta["_class_name"]
    klass = getattr(diffusers, class_name, None)
    if klass is None or not (
        isinstance(klass, type) and issubclass(klass, diffusers.DiffusionPipeline)
    ):
        raise ModelNotFoundError(
            f"{path} is a {class_name}, which diffusers {diffusers.__version__} does not have "
            "(a newer diffusers, or custom pipeline code, which anygen does not run)"
        )
    _check_components(path, meta)
    overrides = {}
    # anygen runs no NSFW filter (as LatentDiffusion); not loading it saves ~1 GB.
    for optional in ("safety_checker", "feature_extractor"):
        if optional in meta and optional in klass._optional_components:
            overrides[optional] = None
    if "requires_safety_checker" in inspect.signature(klass.__init__).parameters:
        overrides["requires_safety_checker"] = False
    try:
        pipe = klass.from_pretrained(path, dtype=dtype, use_safetensors=True, **overrides)
    except load_errors() as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load the {class_name} in {path}: {first}") from None
    return pipe


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _refuse_sampling_options(opts: Options, name: str) -> None:
    opts.refuse(
        TOKEN_SETTINGS,
        f"means nothing to {name!r}: a diffusion model samples no tokens; "
        "use --steps, --scheduler and --guidance",
    )


class DiffusersTextToImage(TextToImage):
    """A diffusers pipeline behind ``generate(prompt, options) -> Output`` and, for
    pipelines that take an image, ``edit(image, instruction, options) -> Output``."""

    family = "diffusers"

    def __init__(
        self,
        pipe,
        *,
        name: str,
        device: torch.device,
        dtype: torch.dtype,
        defaults: dict | None = None,
    ) -> None:
        self.pipe = pipe
        self.name = name
        self.device = torch.device(device)
        self.dtype = dtype
        self.defaults = dict(defaults or {})
        self.class_name = type(pipe).__name__
        self.can_generate = self.class_name in text_to_image_classes()
        self.is_editor = self.class_name in image_edit_classes()
        if not (self.can_generate or self.is_editor):
            raise ModelNotFoundError(
                f"{name} is a {self.class_name}: neither a text-to-image nor an image-editing "
                "pipeline that anygen runs"
            )
        self._edit_pipe = pipe if self.is_editor else None
        self._samplers: dict[str, object] = {}

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
    ) -> DiffusersTextToImage:
        path = Path(path)
        runtime = runtime or Runtime()
        device = torch.device(device)
        pipe = load_diffusers_pipeline(path, dtype)
        if not runtime.offload:
            pipe.to(device)
        configure_pipeline(pipe, runtime, device)
        return cls(pipe, name=name or path.name, device=device, dtype=dtype, defaults=defaults)

    # ------------------------------------------------------------------ sizes

    @property
    def denoiser(self) -> torch.nn.Module | None:
        return getattr(self.pipe, "transformer", None) or getattr(self.pipe, "unet", None)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor as the pipeline's image
        processor sees it (Flux packs 2 x 2 latents, so twice the VAE factor) times the
        denoiser's patch size."""
        processor = getattr(self.pipe, "image_processor", None)
        factor = getattr(getattr(processor, "config", None), "vae_scale_factor", None)
        factor = int(factor or getattr(self.pipe, "vae_scale_factor", 8))
        patch = getattr(getattr(self.denoiser, "config", None), "patch_size", None) or 1
        return factor * int(patch)

    @property
    def default_size(self) -> int:
        sample = getattr(self.pipe, "default_sample_size", None)
        if sample is None:
            sample = getattr(getattr(self.denoiser, "config", None), "sample_size", 64)
        if isinstance(sample, (list, tuple)):
            sample = sample[0]
        return int(sample) * int(getattr(self.pipe, "vae_scale_factor", 8))

    def check_size(self, width: int, height: int) -> None:
        m = self.size_multiple
        for label, value in (("width", width), ("height", height)):
            if value % m:
                raise UserInputError(
                    f"{label} {value} is not a multiple of {m}, the latent grid of {self.name} "
                    f"({self.class_name})"
                )

    # ------------------------------------------------------------------ options

    def _call_kwargs(self, pipe, opts: Options, *, editing: bool) -> tuple[dict, dict]:
        """(keyword arguments for ``pipe.__call__``, resolved settings), refusing options
        this pipeline cannot honour."""
        _refuse_sampling_options(opts, self.name)
        params = inspect.signature(pipe.__call__).parameters
        kwargs: dict = {"output_type": "pil"}
        settings: dict = {"pipeline": type(pipe).__name__}
        if not editing:
            for label, value in (
                ("strength", opts.strength),
                ("image guidance", opts.image_guidance_scale),
            ):
                if value is not None:
                    raise UserInputError(f"{label} is an editing setting (anygen edit)")

        steps = opts.steps or self.defaults.get("steps") or params["num_inference_steps"].default
        kwargs["num_inference_steps"] = settings["steps"] = int(steps)

        guidance = opts.guidance_scale
        if guidance is None:
            guidance = self.defaults.get("guidance_scale")
        if guidance is not None:
            if not self._takes_guidance(params):
                raise UserInputError(
                    f"{self.name} ({self.class_name}) takes no guidance scale: "
                    + self._no_guidance_reason()
                )
            kwargs["guidance_scale"] = guidance
        elif "guidance_scale" in params:
            guidance = params["guidance_scale"].default
        settings["guidance_scale"] = guidance if self._takes_guidance(params) else None

        if opts.negative_prompt is not None:
            if "negative_prompt" not in params or "true_cfg_scale" in params:
                raise UserInputError(
                    f"{self.name} ({self.class_name}) takes no negative prompt"
                    + (
                        ": it is guidance-distilled (negative prompts need true CFG, "
                        "which anygen does not run)"
                        if "true_cfg_scale" in params
                        else ""
                    )
                )
            check_negative_guidance(opts.negative_prompt, guidance)
            kwargs["negative_prompt"] = opts.negative_prompt
        settings["negative_prompt"] = opts.negative_prompt

        for label, value, param in (
            ("strength", opts.strength, "strength"),
            ("image guidance", opts.image_guidance_scale, "image_guidance_scale"),
        ):
            if value is None and editing and param in params:
                value = self.defaults.get(param)  # e.g. from an editor's anygen.json
            if value is None:
                continue
            if param not in params:
                raise UserInputError(
                    f"{self.name} ({type(pipe).__name__}) takes no {label} setting"
                )
            kwargs[param] = settings[param] = value

        scheduler = opts.scheduler or self.defaults.get("scheduler")
        if scheduler is not None:
            kwargs["_scheduler"] = self._sampler(pipe, scheduler)
        settings["scheduler"] = scheduler or type(pipe.scheduler).__name__

        if "use_resolution_binning" in params:
            kwargs["use_resolution_binning"] = False  # exactly the size asked for

        if opts.callback is not None:
            if "callback_on_step_end" not in params:
                raise UserInputError(f"{type(pipe).__name__} takes no step callback")
            callback, total = opts.callback, settings["steps"]

            def on_step_end(_pipe, step, timestep, tensors):
                callback(step + 1, total, {"timestep": timestep})
                return tensors

            kwargs["callback_on_step_end"] = on_step_end
        return kwargs, settings

    def _takes_guidance(self, params) -> bool:
        if "guidance_scale" not in params:
            return False
        # Flux-schnell-like transformers have no guidance embedding: the value is unused
        config = getattr(self.denoiser, "config", None)
        return getattr(config, "guidance_embeds", True) is not False

    def _no_guidance_reason(self) -> str:
        config = getattr(self.denoiser, "config", None)
        if getattr(config, "guidance_embeds", True) is False:
            return "its transformer has no guidance embedding (guidance-distilled, e.g. FLUX.1-schnell)"
        return "its pipeline has no guidance_scale argument"

    def _sampler(self, pipe, name: str):
        """A scheduler by anygen's sampler name, if this pipeline's scheduler lists it as
        compatible (flow-matching pipelines take none of them)."""
        from anygen.models.ldm import SCHEDULERS, make_sampler

        if name not in SCHEDULERS:
            raise UserInputError(
                f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}"
            )
        klass = SCHEDULERS[name]
        current = pipe.scheduler
        compatible = {c.__name__ for c in getattr(current, "compatibles", [])}
        if klass.__name__ != type(current).__name__ and klass.__name__ not in compatible:
            raise UserInputError(
                f"scheduler {name!r} does not fit {self.name}: its {type(current).__name__} "
                "is not interchangeable with it (flow-matching models keep their own)"
            )
        key = f"{type(pipe).__name__}:{name}"
        if key not in self._samplers:  # refuses a sampler that drops zero terminal SNR
            self._samplers[key] = make_sampler(name, current)
        return self._samplers[key]

    def _run(self, pipe, kwargs: dict, progress: bool, what: str) -> list[Image.Image]:
        """Call diffusers' ``pipe``, its progress bar labelled "<model> <what>" like ours."""
        scheduler = kwargs.pop("_scheduler", None)
        original = pipe.scheduler
        pipe.set_progress_bar_config(disable=not progress, leave=False, desc=f"{self.name} {what}")
        try:
            if scheduler is not None:
                pipe.scheduler = scheduler
            with torch.no_grad():
                return list(pipe(**kwargs).images)
        finally:
            pipe.scheduler = original

    # ------------------------------------------------------------------ generate / edit

    def generate_batch(
        self, prompts: list[str], seeds: list[int], options: Options | None = None
    ) -> Output:
        if not self.can_generate:
            raise UserInputError(
                f"{self.name} is an image-editing pipeline ({self.class_name}): use `anygen edit`"
            )
        opts = check_batch(prompts, seeds, options)
        kwargs, settings = self._call_kwargs(self.pipe, opts, editing=False)
        width = opts.width or self.defaults.get("width") or self.default_size
        height = opts.height or self.defaults.get("height") or self.default_size
        self.check_size(width, height)
        kwargs.update(
            prompt=list(prompts),
            width=width,
            height=height,
            num_images_per_prompt=1,
            generator=[make_generator(s, self.device) for s in seeds],
        )
        _negative_per_prompt(kwargs, len(prompts))
        timer = Timer()
        with timer("generate"):
            images = self._run(self.pipe, kwargs, opts.progress, "denoising")
        settings.update(width=width, height=height, seeds=list(seeds))
        return Output(
            segments=images,
            seed=seeds[0],
            model=self.name,
            timings=timer.timings,
            settings=settings,
        )

    def edit_pipeline(self):
        """The pipeline that edits: this one, or diffusers' image-to-image sibling sharing
        its components (SD -> SD img2img, SDXL -> SDXL img2img, Flux -> Flux img2img)."""
        if self._edit_pipe is None:
            self._edit_pipe = image_to_image_pipeline(self.pipe, self.name)
        return self._edit_pipe

    def edit(self, image: Image.Image, instruction: str, options: Options | None = None) -> Output:
        opts = (options or Options()).validate()
        return run_edit(self, self.edit_pipeline(), image, instruction, opts)


def image_to_image_pipeline(pipe, name: str):
    from diffusers import AutoPipelineForImage2Image

    try:
        return AutoPipelineForImage2Image.from_pipe(pipe)
    except (ValueError, KeyError) as e:
        raise UserInputError(
            f"{name} ({type(pipe).__name__}) has no image-to-image variant in diffusers, so "
            f"it cannot edit ({_first_line(e)})"
        ) from None


def prepare_edit_image(image: Image.Image, opts: Options, multiple: int) -> Image.Image:
    """The input image in RGB, resized only when the user asked for a size; sides must
    be multiples of the latent grid (diffusers would crop them silently)."""
    if not isinstance(image, Image.Image):
        raise UserInputError(f"the image to edit is a {type(image).__name__}, not a PIL image")
    image = image.convert("RGB")
    if opts.width or opts.height:
        width, height = opts.width or image.width, opts.height or image.height
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    for label, value in (("width", image.width), ("height", image.height)):
        if value % multiple:
            raise UserInputError(
                f"the image's {label} {value} is not a multiple of {multiple}; resize it, or "
                "pass --width/--height to resize it here"
            )
    return image


def run_edit(owner, edit_pipe, image: Image.Image, instruction: str, opts: Options) -> Output:
    """Edit ``image`` by ``instruction`` with a diffusers image-to-image pipeline;
    ``owner`` gives the name, device, defaults and the option mapping (a
    ``DiffusersTextToImage`` or a ``LatentDiffusion`` through its diffusers view)."""
    check_prompt(instruction)
    if isinstance(owner, DiffusersTextToImage):
        helper = owner
    else:
        keep = ("steps", "guidance_scale", "scheduler")
        helper = DiffusersTextToImage(
            edit_pipe,
            name=owner.name,
            device=owner.device,
            dtype=owner.dtype,
            defaults={k: owner.defaults[k] for k in keep if k in owner.defaults},
        )
    kwargs, settings = helper._call_kwargs(edit_pipe, opts, editing=True)
    image = prepare_edit_image(image, opts, helper.size_multiple)
    params = inspect.signature(edit_pipe.__call__).parameters
    if "height" in params and "width" in params:
        kwargs.update(height=image.height, width=image.width)
    seed = resolve_seed(opts.seed)
    seeds = [seed + i for i in range(opts.num_images)]
    kwargs.update(
        prompt=[instruction] * len(seeds),
        image=[image] * len(seeds),
        num_images_per_prompt=1,
        generator=[make_generator(s, owner.device) for s in seeds],
    )
    _negative_per_prompt(kwargs, len(seeds))
    timer = Timer()
    with timer("edit"):
        images = helper._run(edit_pipe, kwargs, opts.progress, "editing")
    settings.update(width=image.width, height=image.height, seeds=seeds, instruction=instruction)
    return Output(
        segments=images, seed=seed, model=owner.name, timings=timer.timings, settings=settings
    )


def _negative_per_prompt(kwargs: dict, n: int) -> None:
    """A negative prompt as a list as long as the prompts: several diffusers pipelines
    (img2img, InstructPix2Pix, HunyuanDiT, ...) refuse a string beside a list of prompts."""
    if isinstance(kwargs.get("negative_prompt"), str):
        kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * n
