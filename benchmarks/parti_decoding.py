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
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anygen.models.parti import (  # noqa: E402
    PARTI_PRESETS,
    PartiTransformer,
    generate_codes,
    tokenize_prompts,
)
from anygen.pipelines import load_generator, pick_device  # noqa: E402
from anygen.tokenizers.text import load_text_tokenizer  # noqa: E402
from benchmarks.common import bandwidth_bound_s, interleaved, memory_bandwidth  # noqa: E402

PROMPTS = [
    "a red circle above a blue square",
    "three yellow triangles",
    "a small green star in the top left",
    "a large white cross and a purple diamond",
]
CASES = {
    "kv_cache": {},
    "recompute": {"use_cache": False},
    "cfg_two_passes": {"batched_guidance": False},
}


def decode_bytes_per_step(
    model: PartiTransformer, rows: int, context: float, text_len: int
) -> float:
    """Bytes one cached decoding step reads at least: the decoder's weights (the tied
    embedding once, as the output head reads it whole; not the position table, of which
    one row is read), and for each of ``rows`` rows the self-attention K and V of
    ``context`` positions and the cross-attention K and V of ``text_len`` text states."""
    c = model.config
    dec = model.decoder
    elem = next(dec.parameters()).element_size()
    weights = sum(p.numel() for p in dec.parameters()) - dec.transformer.wpe.weight.numel()
    kv_per_position = 2 * c.decoder_layers * c.d_model * elem  # K and V, every layer
    return weights * elem + kv_per_position * rows * (context + text_len)


def measure(
    model: PartiTransformer,
    tokenizer,
    texts: list[str],
    device: torch.device,
    *,
    guidance: float = 3.0,
    repeats: int = 3,
    cases: tuple[str, ...] = tuple(CASES),
    bandwidth: float | None = None,
) -> dict:
    """Time sampling one image's codes for each prompt in ``cases`` ways (the first is the
    one timed against the others; ``kv_cache``, ``recompute``, ``cfg_two_passes``); the
    tokens of every case must be identical. With ``bandwidth`` (bytes/s), also the cached
    decoding rate as a fraction of the memory-bandwidth bound."""
    ids, mask = tokenize_prompts(tokenizer, texts, model.config)
    null = tokenize_prompts(tokenizer, [""] * len(texts), model.config)
    ids, mask = ids.to(device), mask.to(device)
    null = tuple(t.to(device) for t in null)

    def run(**kw):
        gens = [torch.Generator(device.type).manual_seed(i) for i in range(len(texts))]
        return generate_codes(
            model, ids, mask, *null, guidance_scale=guidance, generators=gens, **kw
        )

    t, outs = interleaved(
        {name: (lambda kw=CASES[name]: run(**kw)) for name in cases}, repeats, device
    )
    n = model.config.image_tokens
    row = {
        "codes": n,
        "batch": len(texts),
        "guidance": guidance,
        "device": str(device),
        "kv_cache_s": round(t["kv_cache"], 6),
        "codes_per_s": round(len(texts) * n / t["kv_cache"], 1),
    }
    if "recompute" in cases:
        row["recompute_s"] = round(t["recompute"], 6)
        row["kv_speedup"] = round(t["recompute"] / t["kv_cache"], 2)
        row["kv_tokens_identical"] = bool(torch.equal(outs["kv_cache"], outs["recompute"]))
    if "cfg_two_passes" in cases:
        row["cfg_two_passes_s"] = round(t["cfg_two_passes"], 6)
        row["cfg_batched_speedup"] = round(t["cfg_two_passes"] / t["kv_cache"], 2)
        row["cfg_tokens_identical"] = bool(torch.equal(outs["kv_cache"], outs["cfg_two_passes"]))
    if bandwidth is not None:
        rows = 2 * len(texts) if guidance != 1.0 else len(texts)
        mean_context = (n + 1) / 2  # the self-attention cache grows from 1 to N positions
        per_step = decode_bytes_per_step(model, rows, mean_context, ids.shape[1])
        bound = bandwidth_bound_s(per_step, n, bandwidth)
        row["bandwidth_bound_s"] = round(bound, 7)
        row["fraction_of_bound"] = round(bound / t["kv_cache"], 5)
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
    bandwidth, _ = memory_bandwidth(device)
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
        row = measure(
            model.to(device).eval(),
            tokenizer,
            texts,
            device,
            guidance=args.guidance,
            repeats=args.repeats,
            bandwidth=bandwidth,
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows:
        if not (row["kv_tokens_identical"] and row["cfg_tokens_identical"]):
            raise SystemExit(f"tokens differ: {row}")


if __name__ == "__main__":
    main()
