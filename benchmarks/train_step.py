"""Training-step throughput of the fusion model, and its model FLOPs utilisation (MFU).

One step is what the training loop does: ``fusion_loss`` on packed rows of documents
(text, then an image's codes), backward, AdamW. Real size: the "1b" shape under bf16
autocast over fp32 weights (accelerate's bf16 mixed precision), 8 rows of 2 documents
(16 text tokens and a 1024-code image each: 2088 tokens a row, no padding, so attention
runs its causal kernel without a mask). Tiny: the "tiny" preset in fp32.

MFU = (6 N + 12 L H Q T) x tokens per step / step time / peak bf16 FLOP/s, with N the
parameters in matrix products (``benchmarks.common.training_flops_per_token``). On a CPU
there is no peak to divide by: the row gives the achieved FLOP/s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from anygen.models.fusion import (
    FUSION_PRESETS,
    Batch,
    FusionConfig,
    FusionTransformer,
    ImageSlot,
    TextSlot,
    fusion_loss,
    pack_rows,
)
from benchmarks.common import (
    COMPILED_ONLY_ON_GPU,
    Recorder,
    Settings,
    matmul_params,
    mfu,
    peak_flops,
    sync,
    training_flops_per_token,
)

# (preset, rows, documents a row, text tokens a document)
REAL = ("1b", 8, 2, 16)
TINY = ("tiny", 4, 4, 8)


def make_batch(
    c: FusionConfig, rows: int, docs_per_row: int, text_tokens: int, seed: int = 0
) -> Batch:
    """Packed rows of random documents, each ``text_tokens`` text tokens then one image;
    every row the same length (no padding)."""
    g = torch.Generator().manual_seed(seed)
    first_text = 7  # ids below are special tokens (pad, bos, eos, boi, eoi, img)

    def document():
        text = torch.randint(first_text, c.text_vocab_size, (text_tokens,), generator=g)
        codes = torch.randint(0, c.image_vocab_size, (c.image_tokens,), generator=g)
        return [TextSlot(text.tolist()), ImageSlot(codes)]

    return pack_rows([[document() for _ in range(docs_per_row)] for _ in range(rows)], c)


def step_flops(model: FusionTransformer, batch: Batch) -> tuple[int, float]:
    """Parameters in matrix products, and FLOPs of one training step on ``batch``."""
    c = model.config
    n = matmul_params(model, model.backbone.get_input_embeddings())
    per_token = training_flops_per_token(
        n, c.num_layers, c.num_heads, c.hidden_size // c.num_heads, batch.ids.shape[1]
    )
    return n, per_token * batch.ids.numel()


def measure(
    model: FusionTransformer,
    batch: Batch,
    device: torch.device,
    autocast: torch.dtype | None,
    steps: int,
    warmup: int = 2,
) -> dict:
    """Mean time of ``steps`` training steps after ``warmup`` ones (the first allocates
    the optimizer state, and compiles a compiled model), and the losses."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = batch.to(device)

    def step() -> torch.Tensor:
        precision = (
            torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
        )
        with precision:
            loss = fusion_loss(model, batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    start = time.perf_counter()
    losses = [step() for _ in range(warmup)]
    sync(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    losses += [step() for _ in range(steps)]
    sync(device)
    step_s = (time.perf_counter() - start) / steps
    losses = torch.stack(losses).float().cpu()
    return {
        "step_s": step_s,
        "warmup_s": first,
        "loss_first": float(losses[0]),
        "loss_last": float(losses[-1]),
        "finite": bool(torch.isfinite(losses).all()),
    }


def bench_train(s: Settings, rec: Recorder) -> None:
    """Fusion training steps: tokens/s, achieved FLOP/s and MFU (real: "1b", bf16)."""
    preset, rows, docs, text = REAL if s.real else TINY
    config = dataclasses.replace(FUSION_PRESETS[preset])
    dtype = s.dtype_or(torch.bfloat16)
    autocast = None if dtype == torch.float32 else dtype
    torch.manual_seed(0)
    with torch.device(s.device):
        model = FusionTransformer(config)  # fp32 weights; autocast computes in ``dtype``
    batch = make_batch(config, rows, docs, text)
    n, flops = step_flops(model, batch)
    peak = peak_flops(s.device)
    variants = ["eager"] if s.eager else []
    if s.compiled and s.cuda:
        variants.append("compile")
    elif s.compiled:
        rec.skip("train", "torch.compile of the model", COMPILED_ONLY_ON_GPU)
    steps = max(s.repeats, 3)
    for variant in variants:
        if variant == "compile":
            model.compile()  # in place; the warm-up steps compile forward and backward
        if s.cuda:
            torch.cuda.reset_peak_memory_stats(s.device)
        m = measure(model, batch, s.device, autocast, steps)
        u = mfu(flops, m["step_s"], peak)
        rec.row(
            "train",
            {
                "preset": preset,
                "variant": variant,
                "precision": f"{str(dtype).removeprefix('torch.')}"
                + (" autocast" if autocast else ""),
                "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
                "matmul_parameters_m": round(n / 1e6, 3),
                "rows": rows,
                "seq_len": batch.ids.shape[1],
                "tokens_per_step": batch.ids.numel(),
                "step_s": round(m["step_s"], 6),
                "tokens_per_s": round(batch.ids.numel() / m["step_s"], 1),
                "flops_per_step": flops,
                "achieved_tflops": round(flops / m["step_s"] / 1e12, 6),
                "peak_tflops": None if peak is None else peak / 1e12,
                "mfu": None if u is None else round(u, 4),
                "warmup_s": round(m["warmup_s"], 2),
                "loss_first": round(m["loss_first"], 4),
                "loss_last": round(m["loss_last"], 4),
                "finite": m["finite"],
                "max_memory_gb": (
                    round(torch.cuda.max_memory_allocated(s.device) / 2**30, 1) if s.cuda else None
                ),
            },
        )
