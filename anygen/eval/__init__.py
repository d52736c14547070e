"""shapes-eval: the exact scorer for the shapes world (``shared/specs/shapes-world.md``).

- ``detect``: objects in an image (colour, shape, size, cell, pattern), from the spec alone.
- ``parse``: canonical captions, subject prompts, story events and edit instructions.
- ``judge``: verdicts for captions, stories, edits, subjects, model captions and VQA.
- ``suites``: GenEval-style prompt sets and runs per task, and ``score_folder``.

The judge (detect, parse, judge) never imports the shapes generator or renderer; only
``suites`` does, to build evaluation sets.
"""

from anygen.eval.detect import Analysis, Detection, analyse_image, detect_objects
from anygen.eval.judge import (
    StoryScore,
    SubjectVerdict,
    Verdict,
    satisfies,
    score_answer,
    score_caption,
    score_edit,
    score_story,
    score_subject,
    shows_subject,
    split_story,
)
from anygen.eval.parse import (
    CaptionSpec,
    ObjectSpec,
    Relation,
    parse_caption,
    parse_event,
    parse_instruction,
    parse_subject_prompt,
)
from anygen.eval.suites import (
    T2I_CATEGORIES,
    Report,
    run_caption,
    run_edit,
    run_reconstruction,
    run_story,
    run_subject,
    run_t2i,
    score_folder,
    t2i_prompts,
)

__all__ = [
    "T2I_CATEGORIES",
    "Analysis",
    "CaptionSpec",
    "Detection",
    "ObjectSpec",
    "Relation",
    "Report",
    "StoryScore",
    "SubjectVerdict",
    "Verdict",
    "analyse_image",
    "detect_objects",
    "parse_caption",
    "parse_event",
    "parse_instruction",
    "parse_subject_prompt",
    "run_caption",
    "run_edit",
    "run_reconstruction",
    "run_story",
    "run_subject",
    "run_t2i",
    "satisfies",
    "score_answer",
    "score_caption",
    "score_edit",
    "score_folder",
    "score_story",
    "score_subject",
    "shows_subject",
    "split_story",
    "t2i_prompts",
]
