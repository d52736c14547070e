"""anygen's ldm pipeline against diffusers' StableDiffusionPipeline, in one process.

Both run over the very same components, scheduler and seeds; the script checks that
the images are equal and prints the time ratio (anygen / diffusers, median of
interleaved repeats). With ``--cold`` it also times ``anygen generate`` on the
bundled default in a fresh process against ``python -c "import torch"``.

    python benchmarks/ldm_vs_diffusers.py                       # bundled shapes-ldm, CPU
    python benchmarks/ldm_vs_diffusers.py --model tiny --cold
    python benchmarks/ldm_vs_diffusers.py --model sd15 --device cuda --dtype fp16 \\
        --size 512 --steps 25 --batch 1 8 --attention sdpa math xformers   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anygen.attention import set_diffusers_attention  # noqa: E402
from anygen.models.ldm import LDM_PRESETS, LdmComponents, build_components  # noqa: E402
from anygen.pipelines import Options, load_generator, pick_device, pick_dtype  # noqa: E402
from anygen.pipelines.text_to_image import LatentDiffusion  # noqa: E402
from anygen.tokenizers.text import load_text_tokenizer  # noqa: E402
from benchmarks.common import sync  # noqa: E402

# Stable Diffusion 1.5's component configs (runwayml/stable-diffusion-v1-5: unet/, vae/,
# text_encoder/ and scheduler/ config.json), copied so that an SD-1.5-sized pipeline can
# be built with random weights and no download: an 860 M UNet, an 84 M VAE, a 123 M
# CLIP ViT-L/14 text encoder. Only the tokenizer differs (shapes-bpe: its ids are a
# subset of the 49408 the embedding holds), which changes no cost.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,  # SD 1.5 names heads (8), not their width
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)
SD15_SCHEDULER = dict(  # PNDMScheduler; anygen samples with DPM-Solver++ over its schedule
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
)  # (its config.json also lists clip_sample: false, which PNDM does not take)


def build_sd15(device: torch.device, dtype: torch.dtype) -> LatentDiffusion:
    """An SD-1.5-sized pipeline with random weights, built on ``device`` directly."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = load_text_tokenizer("shapes-bpe")
    tokenizer.model_max_length = SD15_TEXT["max_position_embeddings"]
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: minutes less than on a CPU
        components = LdmComponents(
            vae=AutoencoderKL(**SD15_VAE),
            denoiser=UNet2DConditionModel(**SD15_UNET),
            text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
            tokenizer=tokenizer,
            scheduler=PNDMScheduler(**SD15_SCHEDULER),
        )
    return LatentDiffusion(components, name="sd15", device=device, dtype=dtype)


def build(model: str, device: torch.device, dtype: torch.dtype) -> LatentDiffusion:
    if model == "sd15":
        return build_sd15(device, dtype)
    if model in LDM_PRESETS:
        torch.manual_seed(0)
        return LatentDiffusion(
            build_components(LDM_PRESETS[model], load_text_tokenizer("shapes-bpe")),
            name=model,
            device=device,
            dtype=dtype,
        )
    return load_generator(
        model,
        device=str(device),
        dtype={torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype],
    )


def run_pair(
    gen: LatentDiffusion,
    batch: int,
    size: int,
    *,
    steps: int,
    guidance: float,
    repeats: int,
) -> tuple[dict, list]:
    """Time anygen's loop and diffusers' pipeline over the same components, sampler and
    seeds (median of interleaved repeats, after a warm-up run of each that also gives the
    equality check); returns the row and anygen's images."""
    prompt = "a red circle to the left of a blue square"
    seeds = list(range(batch))
    opts = Options(steps=steps, guidance_scale=guidance, width=size, height=size, progress=False)
    pipe = gen.to_diffusers()
    pipe.scheduler = gen.sampler(gen.defaults["scheduler"])
    pipe.set_progress_bar_config(disable=True)

    def ours():
        out = gen.generate_batch([prompt] * batch, seeds, opts)
        sync(gen.device)
        return out.images

    def theirs():
        out = pipe(
            prompt,
            num_images_per_prompt=batch,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=[torch.Generator(gen.device.type).manual_seed(s) for s in seeds],
        ).images
        sync(gen.device)
        return out

    a, b = ours(), theirs()  # warm-up, and the equality check
    diff = int(
        np.abs(
            np.stack([np.asarray(x, np.int16) for x in a])
            - np.stack([np.asarray(x, np.int16) for x in b])
        ).max()
    )
    times = {"anygen": [], "diffusers": []}
    for _ in range(repeats):
        for name, fn in (("anygen", ours), ("diffusers", theirs)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {
        "batch": batch,
        "size": size,
        "steps": steps,
        "max_pixel_diff": diff,
        "anygen_s": round(med["anygen"], 6),
        "diffusers_s": round(med["diffusers"], 6),
        "ratio": round(med["anygen"] / med["diffusers"], 3),
    }
    return row, a


def cold_start(model: str | None) -> dict:
    """Wall time of `anygen generate` in a fresh process vs `python -c "import torch"`."""

    def wall(cmd: list[str]) -> float:
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        return time.perf_counter() - start

    torch_s = statistics.median(wall([sys.executable, "-c", "import torch"]) for _ in range(3))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "anygen",
            "generate",
            "a red circle",
            "--seed",
            "0",
            "-o",
            str(Path(tmp) / "x.png"),
            "--overwrite",
        ]
        if model:
            cmd += ["--model", model]
        gen_s = statistics.median(wall(cmd) for _ in range(3))
    return {
        "import_torch_s": round(torch_s, 2),
        "anygen_generate_s": round(gen_s, 2),
        "ratio": round(gen_s / torch_s, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        default="shapes-ldm",
        help="tiny | shapes | shapes-dit | sd15 (random weights) or a model name/path",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--attention", nargs="+", default=["sdpa"], help="backends to compare: sdpa math xformers"
    )
    p.add_argument("--cold", action="store_true", help="also time a cold `anygen generate`")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    gen = build(args.model, device, dtype)
    size = args.size or gen.default_size
    rows = []
    for backend in args.attention:
        set_diffusers_attention(gen.components.denoiser, backend)
        set_diffusers_attention(gen.components.vae, backend)
        for batch in args.batch:
            pair, _ = run_pair(
                gen, batch, size, steps=args.steps, guidance=args.guidance, repeats=args.repeats
            )
            row = {"attention": backend, **pair}
            rows.append(row)
            print(
                f"{args.model} {backend:>8} batch {batch:>2} {size}px {args.steps} steps: "
                f"anygen {row['anygen_s']:.3f}s  diffusers {row['diffusers_s']:.3f}s  "
                f"ratio {row['ratio']:.3f}  max pixel diff {row['max_pixel_diff']}"
            )
    result = {
        "model": args.model,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype),
        "torch": torch.__version__,
        "rows": rows,
    }
    if args.cold:
        result["cold"] = cold_start(None if args.model in (*LDM_PRESETS, "sd15") else args.model)
        c = result["cold"]
        print(
            f"cold start: anygen generate {c['anygen_generate_s']}s, import torch {c['import_torch_s']}s, ratio {c['ratio']}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
