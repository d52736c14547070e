"""Fusion decoding: the KV cache against recomputing the whole sequence every step, for
discrete codes and regressed embeddings (then the same weights with a diffusion head drawing
each embedding's residual by ``diffusion_steps`` DDIM steps), in one process over the same
weights and seeds;
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
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anygen.models.fusion import (  # noqa: E402
    FUSION_PRESETS,
    FusionTransformer,
    Plan,
    Prompt,
    Sampling,
    decode,
)
from anygen.pipelines import DTYPES, load_generator, pick_device  # noqa: E402
from benchmarks.common import bandwidth_bound_s, memory_bandwidth, sync  # noqa: E402


def bytes_per_step(model: FusionTransformer, rows: int, context: float) -> float:
    """Bytes one cached decoding step reads at least: every weight once (the input
    embedding table only if tied to the output head: otherwise one row per token; a
    diffusion head's once per DDIM step), plus
    the K and V cache of ``context`` positions for each of ``rows`` rows."""
    c = model.config
    elem = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in model.parameters())
    if not c.tie_word_embeddings:
        weights -= model.backbone.get_input_embeddings().weight.numel()
    if c.diffusion_head:  # its weights are read once per DDIM step
        weights += (c.diffusion_steps - 1) * sum(p.numel() for p in model.diffusion.parameters())
    head_dim = c.hidden_size // c.num_heads
    kv = 2 * c.num_layers * c.num_kv_heads * head_dim * context * rows * elem
    return weights * elem + kv


def image_prompts(model: FusionTransformer, batch: int) -> list[Prompt]:
    """``batch`` short text prompts ending in <boi>: an image is written next."""
    c = model.config
    return [Prompt([c.bos_id, 20 + i % 50, 21, 22, c.boi_id]) for i in range(batch)]


def measure(
    model: FusionTransformer,
    batch: int,
    guidance: float,
    repeats: int,
    device: torch.device,
    bandwidth: float,
    *,
    reference: bool = True,
) -> dict:
    """Time one image span per prompt with the KV cache (and, with ``reference``, without:
    recomputing the whole sequence every step; the outputs must agree), and the cached rate
    as a fraction of the memory-bandwidth bound (``bandwidth`` in bytes/s)."""
    c = model.config
    prompts = image_prompts(model, batch)
    s = Sampling(guidance_scale=guidance)
    plan = Plan(["image"])

    def run(use_cache: bool):
        gens = [torch.Generator(device.type).manual_seed(i) for i in range(batch)]
        sync(device)
        start = time.perf_counter()
        out = decode(model, prompts, plan, s, gens, use_cache=use_cache)
        sync(device)
        return time.perf_counter() - start, out

    modes = (True, False) if reference else (True,)
    # warm up each path, so that no timed run pays first-call setup; the warm-up's outputs
    # are kept to check that the same seeds decode the same span again
    warm = {use_cache: run(use_cache)[1] for use_cache in modes}
    times = {m: [] for m in modes}
    outs = {}
    for _ in range(repeats):  # interleaved, so drift hits both alike
        for use_cache in modes:
            t, outs[use_cache] = run(use_cache)
            times[use_cache].append(t)
    cached = statistics.median(times[True])
    rows = 2 * batch if guidance != 1.0 else batch
    steps = c.image_tokens + 1  # codes, then <eoi>
    context = len(prompts[0].ids) + c.image_tokens / 2  # mean KV length over the span
    bound_s = bandwidth_bound_s(bytes_per_step(model, rows, context), steps, bandwidth)

    def same(a, b):
        for x, y in zip(a, b, strict=True):
            va, vb = x.pieces[0][1], y.pieces[0][1]
            if not (torch.equal(va, vb) if not c.continuous else torch.allclose(va, vb, atol=1e-3)):
                return False
        return True

    row = {
        "mode": c.image_mode,
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "batch": batch,
        "guidance": guidance,
        "image_positions": c.image_tokens,
        "kv_cache_s": round(cached, 6),
        "positions_per_s": round(batch * steps / cached, 1),
        "bandwidth_bound_s": round(bound_s, 7),
        "fraction_of_bound": round(bound_s / cached, 5),
        "deterministic": same(warm[True], outs[True]),
    }
    if reference:
        recomputed = statistics.median(times[False])
        row["recompute_s"] = round(recomputed, 6)
        row["kv_speedup"] = round(recomputed / cached, 2)
        row["kv_identical"] = same(outs[True], outs[False])
    return row


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
    if args.bandwidth_gbs:
        bw, source = args.bandwidth_gbs * 1e9, "given"
    else:
        bw, source = memory_bandwidth(device)
    print(
        json.dumps({"device": str(device), "bandwidth_gbs": round(bw / 1e9, 1), "source": source})
    )
    failed = []
    for preset in args.preset:
        torch.manual_seed(0)
        cfg = dataclasses.replace(FUSION_PRESETS[preset])
        model = FusionTransformer(cfg).to(device=device, dtype=dtype).eval()
        heads = ["regression", "diffusion"] if cfg.continuous else [None]
        for head in heads:
            if head == "diffusion":  # the same weights, plus a diffusion head drawing residuals
                model.add_diffusion_head(scale=1.0).eval()
            for batch in args.batch:
                row = {
                    "preset": preset,
                    "visual_head": head,
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
