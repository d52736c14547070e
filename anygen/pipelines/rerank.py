"""Best of K: draw K candidates per image and keep the one a scorer says fits the prompt.

Parti reranked its samples with a captioner (CoCa), DALL-E with CLIP. Here any
text-to-image generator draws the candidates and a fusion model scores them
(``Fusion.score``: by caption likelihood, or by the evidence the prompt adds to the
image's codes), so one model of anygen checks another's work:

    best = Reranked(load_generator("shapes-parti"), load_generator("shapes-fusion"), 8)
    best.generate("a red circle above a blue square", Options(seed=0))

Candidate 0 of seed s is drawn with s itself, so K = 1 is the base model unchanged (at its
candidate settings, below) and a larger K only adds candidates; candidate j > 0 is drawn
with ``candidate_seeds(s, K)[j]``.
The seed that drew each kept image is recorded (``Output.settings["seeds"]``): the base
model alone, given that seed and the recorded sampling settings, draws the same image again.

Best of K wants more varied candidates than one sample does: a low temperature that
makes a model's single image likelier to be right also makes its K candidates alike. A
model's ``anygen.json`` may therefore hold a ``rerank`` block of sampling defaults for
its candidates, e.g. ``"rerank": {"temperature": 0.35, "top_p": 1.0}``; a setting the
caller gives still wins, and the settings drawn with are recorded in the output as ever.
``select_block`` chooses such a block on validation prompts (``recipes/choose_sampling.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import torch

from anygen.errors import UserInputError
from anygen.pipelines.base import (
    MAX_SEED,
    Options,
    Output,
    TextToImage,
    Timer,
    check_batch,
)
from anygen.pipelines.fusion import SCORES

# What a ``rerank`` block may set: how candidates are drawn, not what is asked for.
SAMPLING = ("guidance_scale", "temperature", "top_k", "top_p", "steps", "scheduler")


def candidate_sampling(base) -> dict:
    """The ``rerank`` block of ``base``'s defaults (empty when it has none), checked."""
    block = base.defaults.get("rerank") or {}
    if not isinstance(block, dict):
        raise UserInputError(
            f"model {base.name!r}: the rerank block of its anygen.json is a "
            f"{type(block).__name__}, not an object of sampling settings"
        )
    unknown = sorted(set(block) - set(SAMPLING))
    if unknown:
        raise UserInputError(
            f"model {base.name!r}: its anygen.json's rerank block sets {', '.join(unknown)}; "
            f"it may set {', '.join(SAMPLING)}"
        )
    for key, value in block.items():
        kind, what = (str, "a name") if key == "scheduler" else ((int, float), "a number")
        if isinstance(value, bool) or not isinstance(value, kind):
            raise UserInputError(
                f"model {base.name!r}: its anygen.json's rerank block gives {key} as "
                f"{value!r}; it must be {what}"
            )
    try:
        Options(**block).validate()
    except UserInputError as e:
        raise UserInputError(f"model {base.name!r}: its anygen.json's rerank block: {e}") from None
    return dict(block)


def candidate_seeds(seed: int, k: int) -> list[int]:
    """The seeds of the ``k`` candidates for ``seed``: ``seed`` itself first, then seeds
    derived by hashing, so that neighbouring seeds share no candidate."""
    out = [seed]
    for j in range(1, k):
        digest = hashlib.blake2b(f"anygen-rerank:{seed}:{j}".encode(), digest_size=8).digest()
        out.append(int.from_bytes(digest, "little") & MAX_SEED)
    return out


class Reranked(TextToImage):
    """``base`` behind the generator interface, keeping the best of ``candidates`` images
    per requested image as ``scorer.score(images, prompts, by=by)`` ranks them. The
    candidates are drawn with ``base``'s ``rerank`` sampling defaults where it has them
    (``sampling``: the settings an option left unset takes)."""

    def __init__(self, base: TextToImage, scorer, candidates: int, *, by: str = "caption"):
        if not hasattr(base, "generate_batch"):
            raise UserInputError(
                f"model {base.name!r} ({base.family}) does not draw images from a prompt in "
                "batches; it cannot be reranked"
            )
        if not hasattr(scorer, "score"):
            raise UserInputError(
                f"model {scorer.name!r} ({getattr(scorer, 'family', '?')}) cannot score images "
                "against text; a reranker must be a fusion model such as shapes-fusion"
            )
        if candidates < 1:
            raise UserInputError(f"candidates must be at least 1, got {candidates}")
        if by not in SCORES:
            raise UserInputError(f"unknown score {by!r}; choose one of {', '.join(SCORES)}")
        if by == "pmi" and getattr(getattr(scorer, "config", None), "continuous", False):
            raise UserInputError(  # now, not after a batch of candidates has been drawn
                f"{scorer.name!r} regresses its images (continuous): they have no likelihood "
                "to score by pmi; score by caption"
            )
        self.base, self.scorer, self.candidates, self.by = base, scorer, candidates, by
        self.name, self.family, self.defaults = base.name, base.family, base.defaults
        self.sampling = candidate_sampling(base)

    def candidate_options(self, opts: Options) -> Options:
        """``opts`` with the ``rerank`` defaults filled in where ``opts`` leaves them unset."""
        unset = {k: v for k, v in self.sampling.items() if getattr(opts, k) is None}
        return dataclasses.replace(opts, **unset)

    def generate_batch(
        self, prompts: list[str], seeds: list[int], options: Options | None = None
    ) -> Output:
        """One image per (prompt, seed): the best of that pair's candidates."""
        opts = self.candidate_options(check_batch(prompts, seeds, options))
        k = self.candidates
        if k > 1 and _draws_codes(self.base):  # greedy codes: every candidate the same
            temperature = opts.temperature
            if temperature is None:
                temperature = self.base.defaults.get("temperature")
            if temperature is not None and temperature <= 0:
                raise UserInputError(
                    "ranking images needs candidates that differ: a temperature above 0"
                )
        cands = [candidate_seeds(s, k) for s in seeds]  # (B, K)
        timer = Timer()
        images, scores = [], []  # [candidate j][prompt i]
        settings, timings = {}, {}
        for j in range(k):  # candidate j of every prompt: memory as without reranking
            with timer("candidates"):
                drawn = self.base.generate_batch(prompts, [c[j] for c in cands], opts)
            with timer("score"):
                scores.append(self.scorer.score(drawn.images, prompts, by=self.by))
            images.append(drawn.images)
            settings = drawn.settings
            for name, t in drawn.timings.items():
                timings[name] = timings.get(name, 0.0) + t
        best = torch.tensor(scores).argmax(dim=0).tolist()  # (B,): the kept candidate
        settings = {
            **settings,
            "seeds": [c[j] for c, j in zip(cands, best, strict=True)],
            "rerank": {"candidates": k, "by": self.by, "scorer": self.scorer.name},
            "rerank_scores": [round(scores[j][i], 4) for i, j in enumerate(best)],
        }
        return Output(
            segments=[images[j][i] for i, j in enumerate(best)],
            seed=seeds[0],
            model=self.name,
            timings={**timings, **timer.timings},
            settings=settings,
        )


def rerank(
    generator: TextToImage,
    candidates: int,
    scorer: str | None = None,
    *,
    by: str = "caption",
    device: str | None = None,
) -> Reranked:
    """``generator`` keeping the best of ``candidates`` images, scored by the model named
    ``scorer`` (loaded on ``device``), or by ``generator`` itself when it can score."""
    if scorer is None:
        if not hasattr(generator, "score"):
            raise UserInputError(
                f"model {generator.name!r} ({generator.family}) cannot score its own images; "
                "name a reranker, a fusion model such as shapes-fusion (--reranker)"
            )
        return Reranked(generator, generator, candidates, by=by)
    from anygen.pipelines import load_generator

    return Reranked(generator, load_generator(scorer, device=device), candidates, by=by)


def select_block(
    base: TextToImage,
    scorer,
    grid: Sequence[dict],
    *,
    candidates: int = 8,
    by: str = "caption",
    plain: dict | None = None,
    **rule,
) -> dict:
    """Choose ``base``'s ``rerank`` block on validation prompts: ``choose_setting``'s rule
    (``rule``: n, seeds, margin, extend_temperatures, batch_size) over ``grid`` against
    ``base``'s plain defaults (or ``plain``), each setting scored by the best of
    ``candidates`` that ``scorer`` keeps. A block ``base`` already has is ignored while
    scoring. Returns the scores and ``chosen``, the block (None: no block)."""
    from anygen.eval.suites import choose_setting

    reranked = Reranked(base, scorer, candidates, by=by)
    reranked.sampling = {}  # a block already there must not fill the settings' gaps
    result = choose_setting(
        lambda prompts, seeds, setting: (
            reranked.generate_batch(prompts, seeds, Options(progress=False, **setting)).images
        ),
        grid,
        {**base.defaults, **(plain or {})},
        desc=f"rerank block of {base.name} (best of {candidates})",
        **rule,
    )
    return {"candidates": candidates, "by": by, "reranker": scorer.name, **result}


def _draws_codes(base) -> bool:
    """Whether ``base`` samples its images as discrete codes (a Parti model, a discrete
    fusion model), so that temperature 0 makes every seed draw the same image."""
    config = getattr(base, "config", None)
    return base.family == "parti" or (base.family == "fusion" and not config.continuous)
