"""Fusion decoding: the KV cache against recomputing the whole sequence every step, for
discrete codes and regressed embeddings, in one process over the same weights and seeds;
the decoding rate as a fraction of the memory-bandwidth bound; and (``--story``) the time
per story scene with and without prefix reuse.

Every step of cached decoding reads all weights and the KV cache so far once; the bound
is ``(weight bytes + KV bytes read) / bandwidth`` per step. The bandwidth is the GPU's
datasheet figure (``--bandwidth-gbs`` overrides it) or, on a CPU, a measured large copy.

    python benchmarks/fusion_decoding.py                               # shapes presets, CPU
    python benchmarks/fusion_decoding.py --preset 1b --device cuda --dtype bf16 --batch 1 16
    python benchmarks/fusion_decoding.py --story --model shapes-fusion --scenes 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from anygen.models.fusion import FUSION_PRESETS, FusionTransformer, Plan, Prompt, Sampling, decode
from anygen.pipelines import DTYPES, load_generator, pick_device

# datasheet memory bandwidth, GB/s
GPU_BANDWIDTH_GBS = {"H200": 4800, "H100": 3350, "A100": 2039, "L4": 300, "A10": 600}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bandwidth_gbs(device: torch.device, override: float | None) -> tuple[float, str]:
    if override:
        return override, "given"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_BANDWIDTH_GBS.items():
            if key in name:
                return float(value), f"datasheet ({name})"
        raise SystemExit(f"unknown GPU {name!r}: pass --bandwidth-gbs")
    x = torch.empty(64 * 2**20 // 4)  # 64 MiB, beyond the caches
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        y.copy_(x)
        best = min(best, time.perf_counter() - start)
    return 2 * x.numel() * 4 / best / 1e9, "measured copy"


def bytes_per_step(model: FusionTransformer, batch: int, context: int) -> float:
    """Weights once, plus the KV cache of ``context`` positions for ``batch`` rows."""
    c = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    elem = next(model.parameters()).element_size()
    head_dim = c.hidden_size // c.num_heads
    kv = 2 * c.num_layers * c.num_kv_heads * head_dim * context * batch * elem
    return weights + kv


def measure(model, batch: int, guidance: float, repeats: int, device, bw: float) -> dict:
    c = model.config
    prompts = [Prompt([c.bos_id, 20 + i % 50, 21, 22, c.boi_id]) for i in range(batch)]
    s = Sampling(guidance_scale=guidance)
    plan = Plan(["image"])

    def run(use_cache: bool):
        gens = [torch.Generator(device.type).manual_seed(i) for i in range(batch)]
        sync(device)
        start = time.perf_counter()
        out = decode(model, prompts, plan, s, gens, use_cache=use_cache)
        sync(device)
        return time.perf_counter() - start, out

    run(True)  # warm up
    times = {True: [], False: []}
    outs = {}
    for _ in range(repeats):  # interleaved, so drift hits both alike
        for use_cache in (True, False):
            t, outs[use_cache] = run(use_cache)
            times[use_cache].append(t)
    cached, recomputed = statistics.median(times[True]), statistics.median(times[False])
    rows = 2 * batch if guidance != 1.0 else batch
    steps = c.image_tokens + 1  # codes, then <eoi>
    context = len(prompts[0].ids) + c.image_tokens // 2  # mean KV length over the span
    bound_s = steps * bytes_per_step(model, rows, context) / (bw * 1e9)

    def same(a, b):
        for x, y in zip(a, b, strict=True):
            va, vb = x.pieces[0][1], y.pieces[0][1]
            if not (torch.equal(va, vb) if not c.continuous else torch.allclose(va, vb, atol=1e-3)):
                return False
        return True

    return {
        "mode": c.image_mode,
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "batch": batch,
        "guidance": guidance,
        "image_positions": c.image_tokens,
        "kv_cache_s": round(cached, 4),
        "recompute_s": round(recomputed, 4),
        "kv_speedup": round(recomputed / cached, 2),
        "kv_identical": same(outs[True], outs[False]),
        "positions_per_s": round(batch * steps / cached, 1),
        "bandwidth_bound_s": round(bound_s, 5),
        "fraction_of_bound": round(bound_s / cached, 3),
    }


def story_times(args, device) -> None:
    from anygen.pipelines.story import generate_story

    gen = load_generator(args.model, device=str(device))
    for reuse in (True, False):
        generate_story(gen, args.prompt, 1, seed=0, reuse_prefix=reuse)  # warm up
        rows = []
        for r in range(args.repeats):
            story = generate_story(gen, args.prompt, args.scenes, seed=r, reuse_prefix=reuse)
            rows.append(story.scene_seconds)
        per_scene = [statistics.median(col) for col in zip(*rows, strict=True)]
        print(
            json.dumps(
                {
                    "model": gen.name,
                    "prefix_reuse": reuse,
                    "scenes": args.scenes,
                    "seconds_per_scene": [round(t, 3) for t in per_scene],
                    "total_s": round(sum(per_scene), 3),
                }
            ),
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", nargs="+", default=["shapes", "shapes-continuous"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    p.add_argument("--bandwidth-gbs", type=float)
    p.add_argument("--story", action="store_true", help="time story scenes instead")
    p.add_argument("--model", default="shapes-fusion", help="--story: the model")
    p.add_argument("--prompt", default="a small red circle in the center")
    p.add_argument("--scenes", type=int, default=4)
    args = p.parse_args()
    device = pick_device(args.device)
    if args.story:
        story_times(args, device)
        return
    dtype = DTYPES[args.dtype] if args.dtype else torch.float32
    bw, source = bandwidth_gbs(device, args.bandwidth_gbs)
    print(json.dumps({"device": str(device), "bandwidth_gbs": round(bw, 1), "source": source}))
    failed = []
    for preset in args.preset:
        torch.manual_seed(0)
        cfg = dataclasses.replace(FUSION_PRESETS[preset])
        model = FusionTransformer(cfg).to(device=device, dtype=dtype).eval()
        for batch in args.batch:
            row = {
                "preset": preset,
                **measure(model, batch, args.guidance, args.repeats, device, bw),
            }
            print(json.dumps(row), flush=True)
            if not row["kv_identical"]:
                failed.append(row)
        del model
    if failed:
        raise SystemExit(f"cached and recomputed outputs differ: {failed}")


if __name__ == "__main__":
    main()
