"""Does the caption decide where an object goes, or does the starting noise?

For each of S seeds, the model draws the nine prompts ``a large red circle in the <position>``
(one per cell of the shapes world's 3 x 3 grid) from that same seed, and shapes-eval's
detector finds where the circle landed. Two figures:

- hits: images with one object, in the named cell (chance is 1/9 when the caption is ignored);
- distinct cells per seed: 1 means the nine prompts land in one cell, so the layout comes from
  the noise alone; 9 means the caption moves the object to every cell it names.

    python benchmarks/layout_probe.py --model shapes-ldm
    python benchmarks/layout_probe.py --model runs/x/model --checkpoint runs/x/denoiser/checkpoints/step-00000250

``--checkpoint`` swaps in the raw (not EMA) denoiser and text encoder of an ldm recipe's
training checkpoint, to probe a run while it trains; ``--model`` must then have the run's
noise schedule (prediction type, zero terminal SNR), which a checkpoint does not record.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from anygen.data.world import POSITIONS
from anygen.eval.detect import detect_objects
from anygen.pipelines import Options, load_generator

CELLS = [POSITIONS[(col, row)] for row in range(3) for col in range(3)]


def layout_table(
    generate: Callable[[list[str], list[int]], Sequence[Image.Image]],
    seeds: Sequence[int],
    obj: str = "large red circle",
) -> dict:
    """Per seed, where each of the nine position prompts put ``obj`` ("n=K" when K != 1
    objects were found), and the two summary figures."""
    rows, hits = {}, 0
    for seed in seeds:
        prompts = [f"a {obj} in the {cell}" for cell in CELLS]
        got = []
        for image in generate(prompts, [seed] * len(prompts)):
            found = detect_objects(image)
            got.append(found[0].position if len(found) == 1 else f"n={len(found)}")
        hits += sum(g == want for g, want in zip(got, CELLS, strict=True))
        rows[seed] = got
    distinct = collections.Counter(len(set(got)) for got in rows.values())
    return {
        "hits": hits,
        "images": len(CELLS) * len(seeds),
        "distinct_cells_per_seed": dict(sorted(distinct.items())),
        "mean_distinct_cells": sum(len(set(g)) for g in rows.values()) / max(len(rows), 1),
        "rows": rows,
    }


def load_checkpoint(generator, checkpoint: Path) -> None:
    """Replace the denoiser and text encoder by a training checkpoint's raw weights."""
    from safetensors.torch import load_file

    state = load_file(checkpoint / "model.safetensors")
    for name in ("denoiser", "text_encoder"):
        part = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
        getattr(generator.components, name).load_state_dict(part, strict=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="shapes-ldm")
    p.add_argument("--checkpoint", type=Path, help="an ldm training checkpoint folder")
    p.add_argument("--seeds", type=int, default=12, help="seeds 500, 501, ...")
    p.add_argument("--object", default="large red circle")
    p.add_argument("--device")
    p.add_argument("-o", "--output", type=Path, help="write the table as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    generator = load_generator(args.model, device=args.device)
    if args.checkpoint:
        load_checkpoint(generator, args.checkpoint)
    table = layout_table(
        lambda prompts, seeds: (
            generator.generate_batch(prompts, seeds, Options(progress=False)).images
        ),
        range(500, 500 + args.seeds),
        args.object,
    )
    for seed, got in table["rows"].items():
        print(seed, " | ".join(got))
    print(
        f"hits {table['hits']} of {table['images']} (chance {table['images'] / 9:.0f}); "
        f"distinct cells per seed {table['distinct_cells_per_seed']} "
        f"(mean {table['mean_distinct_cells']:.2f} of 9)"
    )
    if args.output:
        args.output.write_text(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
