"""Interleaved stories: text and pictures, in order, from any model with the interleaved
interface (``stream(segments, options, seed=, plan=, on_phase=)``, as ``Fusion`` has).

    story = generate_story(gen, "a small red circle in the center", scenes=3, seed=0)
    for segment in stream_story(gen, "a small red circle", scenes=3): ...   # as they come
    longer = generate_story(gen, story.segments, scenes=2)                   # continue one

A scene is a text and then its picture. Scene 1's text is the prompt; each later scene's
text is written by the model (in the shapes world: an event) and then drawn. The whole
story is one decoding pass, so the shared prefix is read once and its KV cache carried
from scene to scene; ``reuse_prefix=False`` starts a fresh pass per scene instead (the
reference for the speed comparison). Scene k draws from its own seed, ``seed + k``
(reseeded where the scene begins), and the story records them.

``candidates=K`` > 1 makes the opening picture (the first one, which only text comes
before: a caption) the best of K, drawn and ranked as text-to-image reranking does it
(``rerank.Reranked`` with the story model as its own scorer: its caption likelihood, and
its ``rerank`` sampling block); the story goes on from the kept picture. Later pictures
follow events, which are not captions: ranked by the evidence the story, or the scene's
event, gives each candidate's codes, they were right no more often on validation stories
than one draw, so they are drawn once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from PIL import Image

from anygen.errors import UserInputError
from anygen.models.fusion import Plan
from anygen.pipelines.base import Options, Segment, check_prompt, resolve_seed

log = logging.getLogger(__name__)

MAX_SCENES = 16


@dataclass
class Story:
    """A story: its segments in reading order (the given ones first), the number of them
    that were given, the seed of each generated scene, and timings."""

    segments: list[Segment]
    given: int
    seeds: list[int]
    model: str
    seed: int
    scene_seconds: list[float] = field(default_factory=list)
    # the opening picture's best of K: {"candidates", "seed" (the kept one's), "score"}
    opening: dict | None = None
    # the sampling options it was told with (those set): with the seed, they reproduce it
    settings: dict = field(default_factory=dict)

    @property
    def images(self) -> list[Image.Image]:
        return [s for s in self.segments if isinstance(s, Image.Image)]

    @property
    def texts(self) -> list[str]:
        return [s for s in self.segments if isinstance(s, str)]

    def scenes(self) -> list[tuple[str, Image.Image]]:
        """(text, picture) pairs: each picture with the text since the picture before."""
        out, pending = [], []
        for s in self.segments:
            if isinstance(s, str):
                pending.append(s)
            else:
                out.append((" ".join(pending), s))
                pending = []
        return out


def _story_plan(segments: Sequence[Segment], scenes: int, max_new_tokens: int) -> Plan:
    """Phases for ``scenes`` more scenes after ``segments``: a story that ends with text
    owes that text its picture first; every other scene is text, then its picture."""
    ends_with_text = isinstance(segments[-1], str)
    phases = ["image"] if ends_with_text else ["text_to_image", "image"]
    phases += ["text_to_image", "image"] * (scenes - 1)
    return Plan(phases, max_new_tokens=max_new_tokens)


def _check(model, prompt: str | Sequence[Segment], scenes: int) -> list[Segment]:
    if not hasattr(model, "stream"):
        raise UserInputError(
            f"model {getattr(model, 'name', model)!r} cannot tell stories: it does not write "
            "interleaved text and images (use a fusion model, e.g. shapes-fusion)"
        )
    if isinstance(scenes, bool) or not isinstance(scenes, int) or not 1 <= scenes <= MAX_SCENES:
        raise UserInputError(
            f"scenes must be a whole number from 1 to {MAX_SCENES}, got {scenes!r}"
        )
    check_prompt(prompt)  # an empty text, or no segments
    segments = [prompt] if isinstance(prompt, str) else list(prompt)
    check_prompt(segments)
    return segments


def stream_story(
    model,
    prompt: str | Sequence[Segment],
    scenes: int = 3,
    options: Options | None = None,
    *,
    seed: int | None = None,
    reuse_prefix: bool = True,
    candidates: int = 1,
    seeds_out: list[int] | None = None,
    times_out: list[float] | None = None,
    opening_out: dict | None = None,
) -> Iterator[Segment]:
    """Yield each new segment (text, then its picture, scene after scene) as soon as it is
    ready. ``seeds_out``/``times_out``, when given, receive each scene's seed and seconds;
    ``opening_out`` the opening picture's best of ``candidates`` (``Story.opening``)."""
    segments = _check(model, prompt, scenes)
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise UserInputError(f"candidates must be a whole number >= 1, got {candidates!r}")
    if candidates > 1 and any(isinstance(s, Image.Image) for s in segments):
        raise UserInputError(
            "candidates rank a story's opening picture, and this story has its pictures "
            "already; continue it with candidates=1"
        )
    opts = (options or Options()).validate()
    seed = resolve_seed(seed if seed is not None else opts.seed)
    Options(seed=seed).validate()  # an explicit seed meets the same bounds
    max_new = opts.max_new_tokens or getattr(model, "defaults", {}).get("max_new_tokens", 24)
    seeds_out = seeds_out if seeds_out is not None else []
    times_out = times_out if times_out is not None else []
    if candidates > 1:
        from anygen.pipelines.rerank import Reranked

        start = time.perf_counter()
        seeds_out.append(seed)
        caption = " ".join(s for s in segments if isinstance(s, str))
        best = Reranked(model, model, candidates).generate_batch([caption], [seed], opts)
        picture = best.images[0]
        if opening_out is not None:
            opening_out.update(
                candidates=candidates,
                seed=best.settings["seeds"][0],
                score=best.settings["rerank_scores"][0],
            )
        yield picture
        times_out.append(time.perf_counter() - start)
        segments, scenes, seed = [*segments, picture], scenes - 1, seed + 1
        if scenes == 0:
            return
    if not reuse_prefix:
        # a fresh pass per scene over everything so far: the prefix is read again each time
        story = list(segments)
        for k in range(scenes):
            start = time.perf_counter()
            seeds_out.append(seed + k)
            plan = _story_plan(story, 1, max_new)
            for _, seg in model.stream(story, opts, seed=seed + k, plan=plan):
                if seg is not None:
                    story.append(seg)
                    yield seg
            times_out.append(time.perf_counter() - start)
        return
    plan = _story_plan(segments, scenes, max_new)
    # phase index -> scene number: a scene starts at each text phase, or at the first image
    starts = [i for i, p in enumerate(plan.phases) if p == "text_to_image" or i == 0]
    clock = [time.perf_counter()]

    def on_phase(index: int, phase: str, generators) -> None:
        if index in starts:
            k = starts.index(index)
            if k:
                times_out.append(time.perf_counter() - clock[0])
                clock[0] = time.perf_counter()
            seeds_out.append(seed + k)
            for g in generators:
                g.manual_seed(seed + k)

    for _, seg in model.stream(segments, opts, seed=seed, plan=plan, on_phase=on_phase):
        if seg is not None:
            yield seg
    times_out.append(time.perf_counter() - clock[0])


def generate_story(
    model,
    prompt: str | Sequence[Segment],
    scenes: int = 3,
    options: Options | None = None,
    *,
    seed: int | None = None,
    reuse_prefix: bool = True,
    candidates: int = 1,
) -> Story:
    """The whole story at once (see ``stream_story``)."""
    given = _check(model, prompt, scenes)
    opts = (options or Options()).validate()
    seed = resolve_seed(seed if seed is not None else opts.seed)
    Options(seed=seed).validate()  # an explicit seed meets the same bounds
    seeds, times, opening = [], [], {}
    new = list(
        stream_story(
            model,
            given,
            scenes,
            opts,
            seed=seed,
            reuse_prefix=reuse_prefix,
            candidates=candidates,
            seeds_out=seeds,
            times_out=times,
            opening_out=opening,
        )
    )
    return Story(
        segments=given + new,
        given=len(given),
        seeds=seeds,
        model=getattr(model, "name", ""),
        seed=seed,
        scene_seconds=times,
        opening=opening or None,
        settings=story_settings(opts),
    )


STORY_SETTINGS = ("guidance_scale", "temperature", "top_k", "top_p", "max_new_tokens", "steps")


def story_settings(opts: Options) -> dict:
    """The sampling options a story was told with, those that were set."""
    return {k: getattr(opts, k) for k in STORY_SETTINGS if getattr(opts, k) is not None}
