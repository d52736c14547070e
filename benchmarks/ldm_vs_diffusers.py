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

from anygen.attention import set_diffusers_attention
from anygen.models.ldm import LDM_PRESETS, LdmConfig, build_components
from anygen.pipelines import Options, load_generator, pick_device, pick_dtype
from anygen.pipelines.text_to_image import LatentDiffusion
from anygen.tokenizers.text import load_text_tokenizer

# An SD-1.5-sized UNet (860 M) and text encoder width, random weights, over shapes-bpe.
SD15 = LdmConfig(
    image_size=512,
    vae_channels=(128, 256, 512, 512),
    vae_layers_per_block=2,
    vae_groups=32,
    unet_channels=(320, 640, 1280, 1280),
    unet_layers_per_block=2,
    unet_groups=32,
    attention_head_dim=8,  # SD 1.5 names heads (8), not their width
    text_hidden=768,
    text_layers=12,
    text_heads=12,
    text_max_length=77,
)


def build(model: str, device: torch.device, dtype: torch.dtype) -> LatentDiffusion:
    if model in ("tiny", "shapes", "sd15"):
        torch.manual_seed(0)
        cfg = SD15 if model == "sd15" else LDM_PRESETS[model]
        return LatentDiffusion(
            build_components(cfg, load_text_tokenizer("shapes-bpe")),
            name=model,
            device=device,
            dtype=dtype,
        )
    return load_generator(
        model,
        device=str(device),
        dtype={torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype],
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_pair(gen: LatentDiffusion, args, batch: int, size: int) -> dict:
    prompt = "a red circle to the left of a blue square"
    seeds = list(range(batch))
    opts = Options(
        steps=args.steps, guidance_scale=args.guidance, width=size, height=size, progress=False
    )
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
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
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
    for _ in range(args.repeats):
        for name, fn in (("anygen", ours), ("diffusers", theirs)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "batch": batch,
        "size": size,
        "max_pixel_diff": diff,
        "anygen_s": round(med["anygen"], 4),
        "diffusers_s": round(med["diffusers"], 4),
        "ratio": round(med["anygen"] / med["diffusers"], 3),
    }


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
        help="tiny | shapes | sd15 (random weights) or a model name/path",
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
            row = {"attention": backend, **run_pair(gen, args, batch, size)}
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
        result["cold"] = cold_start(
            None if args.model in ("tiny", "shapes", "sd15") else args.model
        )
        c = result["cold"]
        print(
            f"cold start: anygen generate {c['anygen_generate_s']}s, import torch {c['import_torch_s']}s, ratio {c['ratio']}"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
