"""``python -m benchmarks list | run ...``: see ``benchmarks/__init__.py``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

# hub calls (none are made: every model here is built from a config) must not retry
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from anygen.errors import UserInputError  # noqa: E402
from anygen.pipelines import DTYPES, pick_device  # noqa: E402
from benchmarks.common import SIZES, VARIANTS, Recorder, Settings, environment  # noqa: E402

SCRIPTS = {
    "ldm_vs_diffusers.py": "anygen vs diffusers on any model or preset, --cold start time",
    "parti_decoding.py": "Parti KV cache vs recompute, batched vs two-pass guidance",
    "fusion_decoding.py": "fusion KV cache vs recompute; --story: scene times with prefix reuse",
    "render_speed.py": "shapes-world scenes per second",
    "eval_speed.py": "shapes-eval images per second",
}


def cmd_list() -> None:
    from benchmarks.suite import BENCHMARKS

    print("benchmarks (python -m benchmarks run NAME ...):")
    for name, fn in BENCHMARKS.items():
        summary = " ".join((fn.__doc__ or "").split())
        print(f"  {name:<9} {summary}")
    print("\nscripts (python benchmarks/NAME --help):")
    for name, what in SCRIPTS.items():
        print(f"  {name:<21} {what}")


def cmd_run(args: argparse.Namespace) -> int:
    from benchmarks.suite import BENCHMARKS, goals

    names = list(BENCHMARKS) if "all" in args.names else list(dict.fromkeys(args.names))
    device = pick_device(args.device)
    size = args.size or ("real" if device.type == "cuda" else "tiny")
    settings = Settings(
        size=size,
        device=device,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        repeats=args.repeats or (2 if size == "real" else 3),
        variant=args.variant,
        attention=tuple(args.attention) if args.attention else None,
        positions=args.positions,
    )
    if settings.dtype == torch.float16 and device.type == "cpu":
        raise UserInputError("fp16 is not supported on CPU; use fp32 (default) or bf16")
    meta = {
        **environment(device),
        "size": settings.size,
        "variant": settings.variant,
        "repeats": settings.repeats,
        "benchmarks": names,
    }
    rec = Recorder(meta, args.json)
    print(json.dumps(meta), flush=True)
    failed = []
    for name in names:
        try:
            BENCHMARKS[name](settings, rec)
        except (RuntimeError, ValueError, UserInputError) as e:  # e.g. out of memory: go on
            traceback.print_exc()
            rec.skip(name, "the rest of this benchmark", f"failed: {type(e).__name__}: {e}")
            failed.append(name)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rec.meta["goals"] = goals(rec)
    rec._write()
    print("\n" + rec.tables())
    print("\n## goals")
    for g in rec.meta["goals"]:
        met = {True: "met", False: "NOT met", None: "no figure"}[g["met"]]
        print(f"{g['goal']}: {g['value']} ({met})")
    if args.json:
        print(f"\nwrote {args.json}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    from benchmarks.suite import BENCHMARKS

    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the benchmarks and scripts")
    r = sub.add_parser("run", help="run benchmarks, print a table, write JSON")
    r.add_argument("names", nargs="*", default=["all"], choices=[*BENCHMARKS, "all"])
    r.add_argument("--size", choices=SIZES, help="default: real on CUDA, tiny elsewhere")
    r.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    r.add_argument(
        "--dtype", choices=sorted(DTYPES), help="default: fp16/bf16 on CUDA, fp32 on CPU"
    )
    r.add_argument("--repeats", type=int, help="timed runs after a warm-up (default 3; real 2)")
    r.add_argument(
        "--variant",
        choices=VARIANTS,
        default="eager",
        help="compiled: the GPU-only torch.compile / CUDA-graph / static-cache variants",
    )
    r.add_argument("--attention", nargs="+", choices=["auto", "sdpa", "math", "xformers"])
    r.add_argument("--positions", type=int, help="image positions to decode (real: 256)")
    r.add_argument("--json", type=Path, help="write the rows here (rewritten after each row)")
    args = p.parse_args(argv)
    try:
        if args.command == "list":
            cmd_list()
            return 0
        return cmd_run(args)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
