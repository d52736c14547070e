"""Text to image by latent diffusion (the ``ldm`` path).

``LatentDiffusion`` holds diffusers/transformers components (a VAE, a UNet or PixArt
transformer, a CLIP text encoder, a scheduler) and runs the denoising loop of
diffusers' Stable Diffusion pipeline step for step: classifier-free guidance with the
unconditional and conditional rows in one batch, the scheduler's own
``scale_model_input``/``step``, the VAE's scaling factor. It saves as a diffusers
pipeline directory and loads any Stable-Diffusion-family directory or hub id. An
InstructPix2Pix denoiser (UNet or DiT, its inputs widened to take the source image's
latents) edits by instruction with the loop of diffusers' InstructPix2Pix pipeline.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
from pathlib import Path

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from anygen.data.datasets import images_to_tensor, tensor_to_images
from anygen.errors import CheckpointError, ModelNotFoundError, UserInputError, load_errors
from anygen.hub import PICKLE_SUFFIXES, atomic_directory, forget_source_paths, read_json_object
from anygen.models.ldm import (
    DEFAULT_SCHEDULER,
    SCHEDULERS,
    LdmComponents,
    denoise,
    make_sampler,
    reads_source_image,
    tokenize,
)
from anygen.pipelines.base import (  # ANYGEN_FILE: beside model_index.json, anygen's defaults
    ANYGEN_FILE,
    EDIT_SETTINGS,
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
from anygen.pipelines.runtime import Runtime, auto_attention, configure_pipeline

log = logging.getLogger(__name__)

MAX_SIDE = 4096


class LatentDiffusion(TextToImage):
    """Text to image by latent diffusion, behind ``generate(prompt, options) -> Output``."""

    family = "ldm"

    def __init__(
        self,
        components: LdmComponents,
        *,
        name: str = "ldm",
        defaults: dict | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.components = components
        self.name = name
        self.defaults = {
            "steps": 25,
            "guidance_scale": 7.5,
            "scheduler": DEFAULT_SCHEDULER,
            **(defaults or {}),
        }
        self.device = torch.device(device)
        self.dtype = dtype
        for module in (components.vae, components.denoiser, components.text_encoder):
            param = next(module.parameters())
            if param.device != self.device:
                module.to(self.device)
            if param.dtype != self.dtype:
                module.to(dtype=self.dtype)
            module.eval()
        # xformers for the UNet/DiT and VAE where it is usable on this device, else sdpa
        auto_attention({"vae": components.vae, "denoiser": components.denoiser}, self.device)
        self._samplers: dict[str, object] = {}
        self._edit_pipe = None

    # ------------------------------------------------------------------ properties

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.components.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return int(self.components.denoiser.config.sample_size) * self.vae_factor

    def check_size(self, width: int, height: int) -> None:
        patch = int(getattr(self.components.denoiser.config, "patch_size", None) or 1)
        f = self.vae_factor * patch  # a DiT patchifies the latents
        why = "the VAE's downsampling factor" + (
            f" times the denoiser's patch size {patch}" if patch > 1 else ""
        )
        for label, value in (("width", width), ("height", height)):
            if value % f:
                raise UserInputError(f"{label} {value} is not a multiple of {f}, {why}")
            if not (f <= value <= MAX_SIDE):
                raise UserInputError(f"{label} {value} is out of range [{f}, {MAX_SIDE}]")

    def sampler(self, name: str):
        if name not in self._samplers:
            self._samplers[name] = make_sampler(name, self.components.scheduler)
        return self._samplers[name]

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """(B, L, D) text states from the text encoder."""
        from anygen.pipelines.embeddings import expand_multi_vector_words

        texts = expand_multi_vector_words(list(texts), self.components.tokenizer)
        ids = tokenize(self.components.tokenizer, texts, self.device)  # (B, L)
        return self.components.text_encoder(ids)[0].to(self.dtype)

    def generate_batch(
        self, prompts: list[str], seeds: list[int], options: Options | None = None
    ) -> Output:
        """One image per (prompt, seed) in one batch; image i depends on prompt i and seed i
        only (each row draws its noise from its own generator)."""
        opts = check_batch(prompts, seeds, options)
        generators = [make_generator(s, self.device) for s in seeds]
        images, settings, timings = self.sample(prompts, generators, opts)
        settings["seeds"] = list(seeds)
        return Output(
            segments=images, seed=seeds[0], model=self.name, timings=timings, settings=settings
        )

    @torch.no_grad()
    def sample(
        self, prompts: list[str], generators: list[torch.Generator], opts: Options
    ) -> tuple[list[Image.Image], dict, dict]:
        c = self.components
        opts.refuse(
            TOKEN_SETTINGS,
            f"means nothing to {self.name!r}: a diffusion model samples no tokens; "
            "use --steps, --scheduler and --guidance",
        )
        opts.refuse(EDIT_SETTINGS, "is an editing setting (anygen edit)")
        if self.edits_by_instruction:
            raise UserInputError(
                f"{self.name} is an instruction editor (its denoiser reads a source image): "
                "use `anygen edit IMAGE INSTRUCTION`"
            )
        timer = Timer()
        steps, guidance, scheduler_name = self._settings(opts)
        width = opts.width or self.default_size
        height = opts.height or self.default_size
        self.check_size(width, height)
        scheduler = self.sampler(scheduler_name)
        do_cfg = guidance > 1.0
        b = len(prompts)

        with timer("text"):
            states = self.encode_text(prompts)  # (B, L, D)
            if do_cfg:
                negative = [opts.negative_prompt or ""] * b
                states = torch.cat([self.encode_text(negative), states])  # (2B, L, D)

        shape = (
            b,
            c.vae.config.latent_channels,
            height // self.vae_factor,
            width // self.vae_factor,
        )

        def predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            model_in = torch.cat([latents] * 2) if do_cfg else latents
            model_in = scheduler.scale_model_input(model_in, t)
            pred = denoise(c.denoiser, model_in, t, states)  # noise or v
            if do_cfg:
                pred_uncond, pred_text = pred.chunk(2)
                pred = pred_uncond + guidance * (pred_text - pred_uncond)
            return pred

        images = self._draw(shape, generators, scheduler, steps, predict, opts, timer)
        settings = {
            "steps": steps,
            "guidance_scale": guidance,
            "scheduler": scheduler_name,
            "width": width,
            "height": height,
            "negative_prompt": opts.negative_prompt,
        }
        return images, settings, timer.timings

    def _settings(self, opts: Options) -> tuple[int, float, str]:
        """Steps, guidance and scheduler name: the options', else this model's defaults."""
        steps = opts.steps if opts.steps is not None else self.defaults["steps"]
        guidance = (
            opts.guidance_scale
            if opts.guidance_scale is not None
            else self.defaults["guidance_scale"]
        )
        check_negative_guidance(opts.negative_prompt, guidance)
        return steps, guidance, opts.scheduler or self.defaults["scheduler"]

    def _draw(
        self,
        shape: tuple[int, ...],
        generators: list[torch.Generator],
        scheduler,
        steps: int,
        predict,
        opts: Options,
        timer: Timer,
    ) -> list[Image.Image]:
        """The sampling loop of diffusers' pipelines, then the VAE: noise of ``shape`` (one
        generator per row) denoised over ``steps`` by ``predict(latents, t) -> noise or v``."""
        with timer("denoise"):
            latents = randn_tensor(
                shape, generator=generators, device=self.device, dtype=self.dtype
            )
            scheduler.set_timesteps(steps, device=self.device)
            latents = latents * scheduler.init_noise_sigma
            # Schedulers that add noise of their own (DDPM, DDIM with eta, SDE solvers) take
            # the generator, as diffusers' pipelines pass it.
            step_params = inspect.signature(scheduler.step).parameters
            step_kwargs = {"generator": generators} if "generator" in step_params else {}
            if "eta" in step_params:
                step_kwargs["eta"] = 0.0
            timesteps = scheduler.timesteps
            bar = tqdm(
                timesteps, desc=f"{self.name} denoising", disable=not opts.progress, leave=False
            )
            for i, t in enumerate(bar):
                pred = predict(latents, t)
                latents = scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
                if opts.callback is not None:
                    opts.callback(i + 1, len(timesteps), {"latents": latents, "timestep": t})
        with timer("decode"):
            vae = self.components.vae
            images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
            return tensor_to_images(images)

    # ------------------------------------------------------------------ runtime, editing

    @property
    def edits_by_instruction(self) -> bool:
        """An InstructPix2Pix model: its denoiser (UNet or DiT) reads the source image's
        latents as extra input channels (``recipes/instruct_edit.py`` trains one)."""
        c = self.components
        return reads_source_image(c.denoiser, c.vae.config.latent_channels)

    def apply_runtime(self, runtime: Runtime) -> None:
        """LoRA adapters, VAE tiling/slicing, attention backend and CPU offload, applied to
        these components in place through their diffusers pipeline view (the denoising loop
        here then runs the adapted modules)."""
        configure_pipeline(self.to_diffusers(), runtime, self.device)

    def edit(self, image: Image.Image, instruction: str, options: Options | None = None) -> Output:
        """Edit ``image`` by ``instruction``. An instruction editor (``edits_by_instruction``)
        follows it, InstructPix2Pix's way (``instruct_edit``); a text-to-image model redraws
        the image towards the instruction read as a caption (SDEdit, with diffusers'
        img2img pipeline over these components): ``options.strength`` sets how much of it
        is redrawn (default 0.8)."""
        from anygen.pipelines.diffusers_t2i import image_to_image_pipeline, run_edit

        opts = (options or Options()).validate()
        if self.edits_by_instruction:
            return self.instruct_edit(image, instruction, opts)
        if self._edit_pipe is None:
            self._edit_pipe = image_to_image_pipeline(self.to_diffusers(), self.name)
        return run_edit(self, self._edit_pipe, image, instruction, opts)

    @torch.no_grad()
    def instruct_edit(self, image: Image.Image, instruction: str, opts: Options) -> Output:
        """InstructPix2Pix sampling, step for step as diffusers'
        ``StableDiffusionInstructPix2PixPipeline`` (whose UNet-only loop this also runs for
        a DiT): the source's latents (the VAE posterior's mode, unscaled) beside the noisy
        latents, and three rows per image, (instruction, source), (negative, source) and
        (negative, no source), combined as uncond + g (text - image) + g_I (image - uncond)."""
        from anygen.pipelines.diffusers_t2i import prepare_edit_image

        c = self.components
        check_prompt(instruction)
        opts.refuse(TOKEN_SETTINGS, f"means nothing to {self.name!r}: it samples no tokens")
        opts.refuse(
            ("strength",),
            f"means nothing to the instruction editor {self.name!r}: it redraws the whole "
            "image, held to the source by --image-guidance",
        )
        steps, guidance, scheduler_name = self._settings(opts)
        image_guidance = (
            opts.image_guidance_scale
            if opts.image_guidance_scale is not None
            else self.defaults.get("image_guidance_scale", 1.5)
        )
        scheduler = self.sampler(scheduler_name)
        patch = int(getattr(c.denoiser.config, "patch_size", None) or 1)
        image = prepare_edit_image(image, opts, self.vae_factor * patch)
        self.check_size(image.width, image.height)
        seed = resolve_seed(opts.seed)
        seeds = [seed + i for i in range(opts.num_images)]
        b = len(seeds)
        do_cfg = guidance > 1.0 and image_guidance >= 1.0  # as diffusers decides
        timer = Timer()
        with timer("text"):
            states = self.encode_text([instruction] * b)  # (B, L, D)
            if do_cfg:
                negative = self.encode_text([opts.negative_prompt or ""] * b)
                states = torch.cat([states, negative, negative])  # (3B, L, D)
        with timer("source"):
            pixels = images_to_tensor([image]).to(self.device, self.dtype)  # (1, 3, H, W)
            source = c.vae.encode(pixels).latent_dist.mode().expand(b, -1, -1, -1)
            if do_cfg:
                source = torch.cat([source, source, torch.zeros_like(source)])  # (3B, C, h, w)

        def predict(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            model_in = torch.cat([latents] * 3) if do_cfg else latents
            model_in = torch.cat([scheduler.scale_model_input(model_in, t), source], dim=1)
            pred = denoise(c.denoiser, model_in, t, states)
            if do_cfg:
                text, image_only, uncond = pred.chunk(3)
                pred = (
                    uncond + guidance * (text - image_only) + image_guidance * (image_only - uncond)
                )
            return pred

        shape = (b, c.vae.config.latent_channels, *source.shape[-2:])
        generators = [make_generator(s, self.device) for s in seeds]
        images = self._draw(shape, generators, scheduler, steps, predict, opts, timer)
        settings = {
            "steps": steps,
            "guidance_scale": guidance,
            "image_guidance_scale": image_guidance,
            "scheduler": scheduler_name,
            "width": image.width,
            "height": image.height,
            "negative_prompt": opts.negative_prompt,
            "seeds": seeds,
            "instruction": instruction,
        }
        return Output(
            segments=images, seed=seed, model=self.name, timings=timer.timings, settings=settings
        )

    # ------------------------------------------------------------------ save / load

    def save_pretrained(
        self,
        directory: str | Path,
        card: str | None = None,
        dtype: torch.dtype | None = None,
        extra_files: dict[str, str] | None = None,
    ) -> Path:
        """Save as a diffusers pipeline directory (plus ``anygen.json``, the ``card`` as
        README.md and ``extra_files``, name -> text), atomically.

        ``dtype`` (e.g. fp16 for bundled weights) converts a copy; this model is unchanged.
        """
        directory = Path(directory)
        pipe = self.to_diffusers()
        if dtype is not None and dtype != self.dtype:
            pipe = copy.deepcopy(pipe).to(dtype=dtype)
        with atomic_directory(directory, marker="model_index.json") as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            forget_source_paths(tmp)
            defaults = dict(self.defaults)
            (tmp / ANYGEN_FILE).write_text(
                json.dumps({"family": "ldm", **defaults}, indent=2) + "\n"
            )
            if card is not None:
                (tmp / "README.md").write_text(card)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
        return directory

    def to_diffusers(self):
        """The equivalent diffusers pipeline over the same component objects."""
        c = self.components
        if c.denoiser.__class__.__name__ == "PixArtTransformer2DModel":
            from diffusers import PixArtAlphaPipeline

            return PixArtAlphaPipeline(
                tokenizer=c.tokenizer,
                text_encoder=c.text_encoder,
                vae=c.vae,
                transformer=c.denoiser,
                scheduler=c.scheduler,
            )
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=c.vae,
            text_encoder=c.text_encoder,
            tokenizer=c.tokenizer,
            unet=c.denoiser,
            scheduler=c.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        name: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        runtime: Runtime | None = None,
    ) -> LatentDiffusion:
        """Load a diffusers pipeline directory of the Stable Diffusion family (or PixArt),
        with ``runtime`` (LoRA, offload, VAE tiling, attention) applied."""
        from anygen.pipelines.diffusers_t2i import read_model_index

        path = Path(path)
        meta = read_model_index(path)
        denoiser_key = (
            "unet" if "unet" in meta else "transformer" if "transformer" in meta else None
        )
        missing = [k for k in ("vae", "text_encoder", "tokenizer", "scheduler") if k not in meta]
        if denoiser_key is None or missing:
            raise ModelNotFoundError(
                f"{path} is a {meta.get('_class_name', 'diffusers')} pipeline, which the ldm path "
                "cannot run (it needs vae, text_encoder, tokenizer, scheduler and a unet or "
                "transformer)"
            )
        parts = {
            key: _load_component(path, key, meta[key], dtype)
            for key in ("vae", "text_encoder", "tokenizer", denoiser_key, "scheduler")
        }
        scheduler = parts["scheduler"]
        components = LdmComponents(
            vae=parts["vae"],
            denoiser=parts[denoiser_key],
            text_encoder=parts["text_encoder"],
            tokenizer=parts["tokenizer"],
            scheduler=scheduler,
        )
        defaults = {}
        extra = path / ANYGEN_FILE
        if extra.is_file():
            defaults = read_json_object(extra)
            defaults.pop("family", None)
        else:
            # a diffusers checkpoint: sample with the scheduler it ships with
            defaults["scheduler"] = _scheduler_name(scheduler)
        model = cls(
            components, name=name or path.name, defaults=defaults, device=device, dtype=dtype
        )
        if runtime is not None:
            model.apply_runtime(runtime)
        return model


# model_index.json names each component's library; only these two are ever imported.
COMPONENT_LIBRARIES = ("diffusers", "transformers")


def _load_component(path: Path, key: str, spec: list, dtype: torch.dtype):
    """One component of a diffusers pipeline directory, by the class model_index.json names.

    Loading the parts directly (rather than through ``DiffusionPipeline``) imports only
    the classes needed, and never code from outside diffusers and transformers.
    """
    import importlib

    if not isinstance(spec, list) or len(spec) != 2 or spec[0] not in COMPONENT_LIBRARIES:
        raise CheckpointError(
            f"{path / 'model_index.json'}: component {key!r} is {spec!r}; anygen loads only "
            f"{' and '.join(COMPONENT_LIBRARIES)} classes"
        )
    library, class_name = spec
    klass = getattr(importlib.import_module(library), class_name, None)
    if klass is None:
        raise CheckpointError(
            f"{library} has no class {class_name!r} (component {key!r} of {path})"
        )
    folder = path / key
    if not folder.is_dir():
        raise CheckpointError(f"{path} has no {key}/ folder, which model_index.json lists")
    try:
        if key == "tokenizer" or key == "scheduler":
            return klass.from_pretrained(folder)
        # weights from safetensors only: a pickle can run code when loaded
        return klass.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    except load_errors() as e:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f" (it holds {', '.join(pickles)}: convert to safetensors)" if pickles else ""
        raise CheckpointError(f"cannot load {key} from {folder}: {e}{hint}") from None


def _scheduler_name(scheduler) -> str:
    for name, klass in SCHEDULERS.items():
        if isinstance(scheduler, klass):
            return name
    return DEFAULT_SCHEDULER
