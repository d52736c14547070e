"""How much best-of-K reranking buys: shapes-eval t2i as a function of K.

For each of N t2i prompts, the generator draws the same K candidates that ``--rerank K``
draws (``anygen.pipelines.rerank.candidate_seeds``, at the model's rerank defaults), the
reranker scores each by caption and by pmi (``Fusion.score``), and shapes-eval judges every
candidate. The table gives, for K = 1, 2, 4, ... up to --k, the score of the candidate
each method keeps, and the oracle: the share of prompts with at least one right candidate,
the most any reranker could reach with those candidates. The judge only measures here; it never picks.

By default the prompts are the validation ones (seed 1000), on which settings are chosen;
reported figures come from ``anygen eval --suite t2i --seed 0 --rerank K``.

    python benchmarks/rerank_curve.py --model shapes-parti --reranker shapes-fusion --k 16
    python benchmarks/rerank_curve.py --model shapes-fusion --k 8 --n 300 -o curve.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from anygen.eval.judge import satisfies
from anygen.eval.suites import t2i_prompts
from anygen.pipelines import Options, load_generator
from anygen.pipelines.fusion import SCORES
from anygen.pipelines.rerank import candidate_sampling, candidate_seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="the text-to-image model drawing candidates")
    p.add_argument("--reranker", help="the fusion model scoring them (default: --model)")
    p.add_argument("--k", type=int, default=8, help="candidates per prompt")
    p.add_argument("--n", type=int, default=300, help="t2i prompts")
    p.add_argument("--seed", type=int, default=1000, help="prompt seed (1000: validation)")
    p.add_argument("-o", "--output", type=Path, help="write every candidate's verdict here")
    return p.parse_args(argv)


def kept(verdicts: list[bool], scores: list[float], k: int) -> bool:
    """The verdict of the best-scored of the first ``k`` candidates (ties: the first)."""
    best = max(range(k), key=lambda j: (scores[j], -j))
    return verdicts[best]


def curve(rows: list[dict], ks: list[int]) -> dict:
    """{k: {method: {category: score}}} for the methods of SCORES and the oracle."""
    out = {}
    for k in ks:
        table = collections.defaultdict(lambda: collections.defaultdict(list))
        for r in rows:
            picks = {m: kept(r["right"], r[m], k) for m in SCORES}
            picks["oracle"] = any(r["right"][:k])
            for method, right in picks.items():
                for cat in (r["category"], "overall"):
                    table[method][cat].append(right)
        out[k] = {m: {c: sum(v) / len(v) for c, v in cats.items()} for m, cats in table.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gen = load_generator(args.model)
    scorer = load_generator(args.reranker) if args.reranker else gen
    prompts = t2i_prompts(args.n, args.seed)
    sampling = candidate_sampling(gen)  # the model's rerank block: as --rerank draws them
    options = Options(progress=False, **sampling)
    rows, seconds = [], collections.Counter()
    for i, p in enumerate(tqdm(prompts, desc="rerank curve")):
        seeds = candidate_seeds(args.seed + i, args.k)
        start = time.perf_counter()
        images = gen.generate_batch([p.prompt] * args.k, seeds, options).images
        seconds["candidates"] += time.perf_counter() - start
        row = {"category": p.category, "prompt": p.prompt, "seeds": seeds}
        for method in SCORES:
            start = time.perf_counter()
            row[method] = scorer.score(images, [p.prompt] * args.k, by=method)
            seconds[method] += time.perf_counter() - start
        row["right"] = [bool(satisfies(im, p.prompt)) for im in images]
        rows.append(row)
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64) if k <= args.k} | {args.k})
    result = curve(rows, ks)
    cats = list(result[ks[0]]["oracle"])
    print(
        f"{args.model} reranked by {scorer.name}: {args.n} t2i prompts (seed {args.seed}), "
        f"candidates at {sampling or 'the model defaults'}; "
        f"per candidate {seconds['candidates'] / (args.n * args.k) * 1000:.1f} ms to draw, "
        + ", ".join(
            f"{seconds[m] / (args.n * args.k) * 1000:.1f} ms to score by {m}" for m in SCORES
        )
    )
    print("K    method   " + " ".join(f"{c[:10]:>10}" for c in cats))
    for k in ks:
        for method in (*SCORES, "oracle"):
            scores = result[k][method]
            print(f"{k:<4} {method:<8} " + " ".join(f"{scores[c]:10.3f}" for c in cats))
    if args.output:
        payload = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "sampling": sampling,
            "curve": result,
            "rows": rows,
        }
        args.output.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
