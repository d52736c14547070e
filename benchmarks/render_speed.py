"""Shapes-world render speed: scenes per second at 64 px on one CPU core.

    python benchmarks/render_speed.py [--n 5000] [--size 64]

Scenes are sampled first (not timed, train split, 1 to 3 objects, no patterns); the timed
loop calls ``render_scene`` on each, after a warm-up pass that fills the coverage cache.
The process is pinned to one core where the OS allows it.
"""

from __future__ import annotations

import argparse
import os
import random
import time

from anygen.data.render import render_scene
from anygen.data.shapes import sample_scene


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="scenes to render per repeat")
    parser.add_argument("--size", type=int, default=64, help="canvas side in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timed passes")
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    rng = random.Random(0)
    scenes = [sample_scene(rng) for _ in range(args.n)]
    for scene in scenes:  # warm-up: fills the coverage cache
        render_scene(scene, args.size)
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        for scene in scenes:
            render_scene(scene, args.size)
        best = min(best, time.perf_counter() - start)
    rate = args.n / best
    print(f"{rate:.0f} scenes/s at {args.size} px on one core (best of {args.repeats} x {args.n})")


if __name__ == "__main__":
    main()
