"""Interleaved documents of the shapes world, for early-fusion models: text and scenes in
reading order, mixed into one stream (Chameleon and Emu2 train on such a mix).

Kinds (``DOCUMENT_KINDS``):

    t2i      caption, image                     text to image
    caption  image, "what is in this image ?", caption
                                                 image to text (canonical captions only)
    vqa      image, "question ?", answer        answering about an image
    story    text, image, event, image, ...     2 to 4 scenes (the spec's stories)
    edit     image, instruction, image          instruction editing (the spec's edits)
    subject  3-5 reference images, prompt, image   in-context subject-driven generation
                                                 (Emu2-Gen style; the spec's subjects)

Scenes stand for images; the consumer renders them (``render_image``) and turns them into
codes or embeddings. Document ``i`` of a mix is a function of (seed, i, split, mix) only,
like every shapes-world sample.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

from anygen.data.shapes import task_sample
from anygen.data.world import Scene
from anygen.errors import UserInputError

DOCUMENT_KINDS: tuple[str, ...] = ("t2i", "caption", "vqa", "story", "edit", "subject")
# what the bundled discrete fusion model trains on; subject documents (up to six images)
# suit the continuous model, whose images are 16 positions rather than 64
DEFAULT_MIX: dict[str, float] = {
    "t2i": 0.35,
    "caption": 0.15,
    "vqa": 0.15,
    "story": 0.2,
    "edit": 0.15,
}
QUESTION_END = " ?"
# What a caption answers. Without it a document that starts with an image could go on as a
# caption, a question or an edit instruction, and a model asked for a caption writes any.
CAPTION_QUESTION = "what is in this image ?"

Segment = str | Scene


@dataclass(frozen=True)
class Document:
    kind: str
    segments: tuple[Segment, ...]

    @property
    def scenes(self) -> list[Scene]:
        return [s for s in self.segments if isinstance(s, Scene)]


def question_text(question: str) -> str:
    """A question as the models read it: ending in " ?" (added when missing)."""
    q = question.strip()
    return q if q.endswith("?") else q + QUESTION_END


def document(
    kind: str, seed: int, index: int, split: str = "train", *, paraphrase_prob: float = 0.0
) -> Document:
    """Document ``index`` of ``kind`` under ``seed``. ``paraphrase_prob`` applies to the
    prompts of t2i documents only: what a caption or answer writes stays canonical."""
    if kind == "t2i":
        s = task_sample("t2i", seed, index, split, paraphrase_prob=paraphrase_prob)
        return Document(kind, (s.text, s.scene))
    if kind == "caption":
        s = task_sample("t2i", seed, index, split)
        return Document(kind, (s.scene, CAPTION_QUESTION, s.canonical))
    if kind == "vqa":
        s = task_sample("vqa", seed, index, split)
        return Document(kind, (s.scene, question_text(s.question), s.answer))
    if kind == "story":
        s = task_sample("story", seed, index, split)
        segments: list[Segment] = []
        for text, scene in zip(s.texts, s.scenes, strict=True):
            segments += [text, scene]
        return Document(kind, tuple(segments))
    if kind == "edit":
        s = task_sample("edit", seed, index, split)
        return Document(kind, (s.source, s.instruction, s.target))
    if kind == "subject":
        s = task_sample("subject", seed, index, split)
        return Document(kind, (*s.references, s.prompt, s.scene))
    raise UserInputError(f"unknown document kind {kind!r}; choose from {DOCUMENT_KINDS}")


def check_mix(mix: Mapping[str, float]) -> dict[str, float]:
    """``mix`` normalised to sum 1; unknown kinds and negative weights are errors."""
    unknown = set(mix) - set(DOCUMENT_KINDS)
    if unknown:
        raise UserInputError(
            f"unknown document kinds {sorted(unknown)}; choose from {DOCUMENT_KINDS}"
        )
    if any(not math.isfinite(w) or w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise UserInputError(
            f"document mix weights must be finite, >= 0 and not all 0, got {dict(mix)}"
        )
    total = sum(mix.values())
    return {k: w / total for k, w in mix.items() if w > 0}


def mixed_document(
    seed: int,
    index: int,
    mix: Mapping[str, float] | None = None,
    split: str = "train",
    *,
    paraphrase_prob: float = 0.0,
) -> Document:
    """Document ``index`` of a stream mixing kinds with weights ``mix``."""
    weights = check_mix(mix or DEFAULT_MIX)
    rng = random.Random(f"anygen-documents:{seed}:{index}")
    kind = rng.choices(list(weights), weights=list(weights.values()))[0]
    return document(kind, seed, index, split, paraphrase_prob=paraphrase_prob)
