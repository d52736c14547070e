"""How a loaded model runs: LoRA adapters, textual-inversion embeddings, CPU offload, VAE
tiling/slicing, attention.

These are load-time choices (``anygen generate --lora ... --embedding ... --offload
--vae-tiling --attention math``), separate from the per-call ``Options``. diffusers
pipelines honour all of them; transformers models only the attention backend, and refuse
the rest with a message naming the option, never silently.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from anygen.errors import UserInputError
from anygen.pipelines.lora import LoraSpec, load_loras

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    loras: Sequence[LoraSpec] = field(default_factory=tuple)
    embeddings: Sequence[str] = field(default_factory=tuple)  # textual-inversion files
    offload: bool = False  # accelerate: each model on the accelerator only while it runs
    vae_tiling: bool = False  # decode large images tile by tile
    vae_slicing: bool = False  # decode a batch one image at a time
    # "sdpa" | "math" | "xformers" | "auto"; None: auto for the diffusers models (xformers
    # where usable on CUDA), transformers models as loaded (sdpa)
    attention: str | None = None

    def refuse_for(self, model: str, family: str) -> None:
        """For models that are not diffusers pipelines: refuse the diffusers-only options."""
        asked = [
            flag
            for flag, value in (
                ("--lora", bool(self.loras)),
                ("--embedding", bool(self.embeddings)),
                ("--offload", self.offload),
                ("--vae-tiling", self.vae_tiling),
                ("--vae-slicing", self.vae_slicing),
            )
            if value
        ]
        if asked:
            raise UserInputError(
                f"{', '.join(asked)} apply to diffusers pipelines; {model} is a {family} "
                "model (use --device and --dtype to fit it in memory)"
            )

    def transformers_attn_implementation(self) -> str | None:
        """The ``attn_implementation`` to load a transformers model with (None: default;
        ``auto`` keeps transformers' own sdpa, as ``auto_attention`` does)."""
        if self.attention in (None, "auto"):
            return None
        from anygen.attention import transformers_attn_implementation

        return transformers_attn_implementation(self.attention)


def check_offload_device(device: torch.device) -> None:
    if device.type == "cpu":
        raise UserInputError(
            "--offload keeps weights on the CPU and moves each model to an accelerator while "
            "it runs; this run is on the CPU already: use --device cuda, or drop --offload"
        )


def set_attention(modules: dict, backend: str, device: torch.device | None = None) -> None:
    """Switch every diffusers model and transformers model among ``modules`` (name ->
    component) to ``backend``. Both libraries load with PyTorch SDPA, so "sdpa" leaves
    transformers models and diffusers models of other processors (SD3's joint attention,
    custom ones) as loaded, and switches back the classic-processor models that
    ``auto_attention`` may have put on xformers. ``device``: where the models will run,
    when they are not there yet (offloaded to the CPU)."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    from anygen.attention import (
        has_classic_attention,
        set_diffusers_attention,
        transformers_attn_implementation,
    )

    implementation = transformers_attn_implementation(backend)  # fails first for xformers
    for name, module in modules.items():
        if isinstance(module, ModelMixin):
            if backend == "sdpa" and not has_classic_attention(module):
                continue
            set_diffusers_attention(module, backend, device)
        elif isinstance(module, PreTrainedModel) and backend != "sdpa":
            module.set_attn_implementation(implementation)
        log.debug("attention of %s set to %s", name, backend)


def library_models(*roots: torch.nn.Module) -> dict:
    """The outermost diffusers and transformers models inside ``roots`` (name -> model):
    what ``set_attention`` switches in a model anygen assembles from them (Parti's T5
    encoder and GPT-2 decoder, the fusion backbone, a visual codec's UNet)."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    found: dict = {}
    for i, root in enumerate(roots):
        inside: list[str] = []
        for name, module in root.named_modules():
            if any(outer == "" or name.startswith(f"{outer}.") for outer in inside):
                continue
            if isinstance(module, (ModelMixin, PreTrainedModel)):
                inside.append(name)
                found[f"{i}.{name}" if name else str(i)] = module
    return found


def auto_attention(modules: dict, device: torch.device | str) -> str:
    """Switch the diffusers models among ``modules`` (name -> component) to xformers where
    it is usable on ``device`` (``anygen.attention.auto_backend``); returns the backend
    chosen. Nothing changes where the choice is sdpa (both libraries load with it), nor for
    transformers models (text encoders run once per image), nor for diffusers models whose
    attention is not of the classic processors (Flux's dispatcher, SD3's joint attention):
    ``--attention xformers`` switches those. A model that still cannot be switched keeps
    its processors, with a warning."""
    from anygen.attention import auto_backend, has_classic_attention, set_diffusers_attention

    backend = auto_backend(device)
    if backend == "sdpa":
        return backend
    from diffusers import ModelMixin

    for name, module in modules.items():
        if not isinstance(module, ModelMixin):
            continue
        if not has_classic_attention(module):
            log.debug("%s keeps its attention: not classic processors", name)
            continue
        try:
            set_diffusers_attention(module, backend, device)  # offloaded: still on the CPU
        except UserInputError as e:
            log.warning("%s keeps its attention processors: %s", name, e)
            continue
        log.debug("attention of %s set to %s (auto)", name, backend)
    return backend


def configure_pipeline(pipe, runtime: Runtime, device: torch.device) -> None:
    """Apply ``runtime`` to a diffusers pipeline whose models are already on ``device``
    (or, with offload, are moved there now under accelerate's hooks)."""
    if runtime.offload:
        check_offload_device(device)
    if runtime.attention in (None, "auto"):
        auto_attention(dict(pipe.components), device)
    else:
        set_attention(dict(pipe.components), runtime.attention, device)
    if runtime.embeddings:
        from anygen.pipelines.embeddings import load_embeddings

        load_embeddings(pipe, runtime.embeddings)
    if runtime.loras:
        load_loras(pipe, runtime.loras)
    vae = getattr(pipe, "vae", None)
    for wanted, method, flag in (
        (runtime.vae_tiling, "enable_tiling", "--vae-tiling"),
        (runtime.vae_slicing, "enable_slicing", "--vae-slicing"),
    ):
        if not wanted:
            continue
        if vae is None or not hasattr(vae, method):
            raise UserInputError(
                f"{flag}: the VAE of this pipeline ({type(vae).__name__}) does not support it"
            )
        getattr(vae, method)()
    if runtime.offload:
        pipe.enable_model_cpu_offload(device=device)
