"""Shapes world (``shared/specs/shapes-world.md``): generation, rendering, datasets, export.

- ``world``: the spec's constants and types (Obj, Scene, Subject, Event).
- ``shapes``: scenes, captions, paraphrases, stories, edits, subjects, VQA, text corpus.
- ``render``: scenes to pixels.
- ``datasets``: torch Datasets per task (imported on its own: it needs torch).
- ``export``: PNGs plus ``metadata.jsonl`` on disk.
"""

from anygen.data.export import read_metadata, write_shapes
from anygen.data.render import render_image, render_scene
from anygen.data.shapes import (
    HELD_OUT_SUBJECTS,
    TASKS,
    Caption,
    Edit,
    Story,
    SubjectIdentity,
    apply_event,
    canonical_captions,
    paraphrase,
    parse_caption,
    sample_caption,
    sample_captioned_scene,
    sample_edit,
    sample_event,
    sample_rng,
    sample_scene,
    sample_story,
    sample_subject,
    sample_subject_prompt,
    sample_vqa,
    subject_references,
    task_sample,
    text_corpus,
)
from anygen.data.world import HELD_OUT_PAIRS, Event, Obj, Scene, Subject

__all__ = [
    "HELD_OUT_PAIRS",
    "HELD_OUT_SUBJECTS",
    "TASKS",
    "Caption",
    "Edit",
    "Event",
    "Obj",
    "Scene",
    "Story",
    "Subject",
    "SubjectIdentity",
    "apply_event",
    "canonical_captions",
    "paraphrase",
    "parse_caption",
    "read_metadata",
    "render_image",
    "render_scene",
    "sample_caption",
    "sample_captioned_scene",
    "sample_edit",
    "sample_event",
    "sample_rng",
    "sample_scene",
    "sample_story",
    "sample_subject",
    "sample_subject_prompt",
    "sample_vqa",
    "subject_references",
    "task_sample",
    "text_corpus",
    "write_shapes",
]
