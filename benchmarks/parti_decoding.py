"""Parti decoding: the KV cache against recomputing the prefix, and guidance in one batch
against two passes, in one process over the same weights and seeds.

For each image length (64 and 256 codes by default) the script samples the codes both
ways, checks that the tokens are identical, and prints the time of each and the ratio
(median of interleaved repeats).

    python benchmarks/parti_decoding.py                         # shapes preset, random weights
    python benchmarks/parti_decoding.py --preset base --device cuda --batch 16
    python benchmarks/parti_decoding.py --model shapes-parti    # the bundled model (64 codes)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from anygen.models.parti import PARTI_PRESETS, PartiTransformer, generate_codes, tokenize_prompts
from anygen.pipelines import load_generator, pick_device
from anygen.tokenizers.text import load_text_tokenizer

PROMPTS = [
    "a red circle above a blue square",
    "three yellow triangles",
    "a small green star in the top left",
    "a large white cross and a purple diamond",
]


def timed(fn, repeats: int, device: torch.device) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def measure(model, tokenizer, texts, args, device: torch.device) -> dict:
    """Time one image length three ways; the tokens of each must be identical."""
    ids, mask = tokenize_prompts(tokenizer, texts, model.config)
    null = tokenize_prompts(tokenizer, [""] * len(texts), model.config)
    ids, mask = ids.to(device), mask.to(device)
    null = tuple(t.to(device) for t in null)

    def run(**kw):
        gens = [torch.Generator(device.type).manual_seed(i) for i in range(len(texts))]
        return generate_codes(
            model, ids, mask, *null, guidance_scale=args.guidance, generators=gens, **kw
        )

    run()  # warm up
    cases = {
        "kv_cache": {},
        "recompute": {"use_cache": False},
        "cfg_two_passes": {"batched_guidance": False},
    }
    results = {name: [] for name in cases}
    outs = {}
    for _ in range(args.repeats):  # interleaved, so drift hits every case alike
        for name, kw in cases.items():
            t, outs[name] = timed(lambda kw=kw: run(**kw), 1, device)
            results[name].append(t)
    t = {name: statistics.median(v) for name, v in results.items()}
    row = {
        "codes": model.config.image_tokens,
        "batch": len(texts),
        "device": str(device),
        "kv_cache_s": round(t["kv_cache"], 4),
        "recompute_s": round(t["recompute"], 4),
        "kv_speedup": round(t["recompute"] / t["kv_cache"], 2),
        "kv_tokens_identical": bool(torch.equal(outs["kv_cache"], outs["recompute"])),
        "cfg_two_passes_s": round(t["cfg_two_passes"], 4),
        "cfg_batched_speedup": round(t["cfg_two_passes"] / t["kv_cache"], 2),
        "cfg_tokens_identical": bool(torch.equal(outs["kv_cache"], outs["cfg_two_passes"])),
    }
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PARTI_PRESETS), default="shapes")
    p.add_argument("--model", help="a saved parti model instead of a random preset")
    p.add_argument("--codes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device")
    args = p.parse_args()
    device = pick_device(args.device)
    tokenizer = load_text_tokenizer("shapes-bpe")
    texts = (PROMPTS * args.batch)[: args.batch]
    rows = []
    for n_codes in args.codes:
        if args.model:
            model = load_generator(args.model, device=str(device)).transformer
            if n_codes != model.config.image_tokens:
                continue
        else:
            torch.manual_seed(0)
            model = PartiTransformer(
                dataclasses.replace(PARTI_PRESETS[args.preset], image_tokens=n_codes)
            )
        row = measure(model.to(device).eval(), tokenizer, texts, args, device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows:
        if not (row["kv_tokens_identical"] and row["cfg_tokens_identical"]):
            raise SystemExit(f"tokens differ: {row}")


if __name__ == "__main__":
    main()
