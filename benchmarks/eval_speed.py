"""shapes-eval speed: detector images/s per canvas size, and judge verdicts/s.

    python benchmarks/eval_speed.py [--n 1000] [--sizes 49 64 128]

Renders random test-split scenes with anygen.data, then times ``detect_objects`` alone
(the renders are made beforehand) and ``satisfies`` on the detections.
"""

from __future__ import annotations

import argparse
import random
import time

from anygen.data.render import render_scene
from anygen.data.shapes import canonical_captions, sample_scene
from anygen.eval import detect_objects, satisfies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="scenes per canvas size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[49, 64, 128])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    scenes = [sample_scene(rng, None, "test") for _ in range(args.n)]
    for size in args.sizes:
        images = [render_scene(s, size) for s in scenes]
        t0 = time.perf_counter()
        detections = [detect_objects(im) for im in images]
        seconds = time.perf_counter() - t0
        captions = [canonical_captions(s)[0] for s in scenes]
        t1 = time.perf_counter()
        passed = sum(satisfies(d, c).ok for d, c in zip(detections, captions, strict=True))
        judge_seconds = time.perf_counter() - t1
        print(
            f"{size:4d} px: detect {args.n / seconds:7.1f} images/s "
            f"({1000 * seconds / args.n:.2f} ms each); judge {args.n / judge_seconds:8.0f} "
            f"verdicts/s; {passed}/{args.n} true captions accepted"
        )


if __name__ == "__main__":
    main()
