"""torch Datasets over the shapes world, one per task: t2i, story, edit, subject, vqa.

Sample ``i`` is a function of (task, seed, i, split, options) only (``shapes.task_sample``),
so the datasets are random-access, reproducible and safe in any number of DataLoader
workers. Images are float32 tensors (3, S, S) in [-1, 1]; texts and scene metadata ride
along as Python objects. Items hold ``Scene`` objects, which torch's default collate
cannot batch: use ``collate`` (stacks same-shape tensors, lists everything else).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from anygen.data.render import check_size, render_scene
from anygen.data.shapes import (
    Edit,
    Story,
    SubjectSample,
    T2ISample,
    VQASample,
    check_split,
    task_sample,
)
from anygen.data.world import Scene
from anygen.errors import UserInputError

logger = logging.getLogger(__name__)


def image_tensor(scene: Scene, size: int = 64) -> torch.Tensor:
    """The scene rendered as a float32 tensor (3, size, size) in [-1, 1]."""
    arr = render_scene(scene, size)  # (S, S, 3) uint8
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float() / 127.5 - 1.0


def tensor_to_uint8(image: torch.Tensor) -> np.ndarray:
    """Inverse of ``image_tensor``: (3, S, S) in [-1, 1] -> (S, S, 3) uint8."""
    arr = ((image.detach().cpu().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return arr.to(torch.uint8).permute(1, 2, 0).numpy()


def images_to_tensor(images: list, size: int | None = None) -> torch.Tensor:
    """PIL images (RGB, all one size, or resized to ``size``) -> (B, 3, S, S) in [-1, 1]."""
    arrays = []
    for im in images:
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), resample=3)  # bicubic
        arrays.append(np.asarray(im, dtype=np.uint8))
    if len({a.shape for a in arrays}) > 1:
        raise UserInputError(f"images differ in size: {sorted({a.shape[:2] for a in arrays})}")
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1.0


def tensor_to_images(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> PIL images, rounded exactly as diffusers' VaeImageProcessor."""
    from PIL import Image

    images = (images / 2 + 0.5).clamp(0, 1)
    array = images.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    array = (array * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch items: tensors of one shape are stacked (B, ...), all else becomes a list."""
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if all(isinstance(v, torch.Tensor) for v in values) and len({v.shape for v in values}) == 1:
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


class ShapesDataset(Dataset):
    """``length`` samples of ``task`` under ``seed``; subclasses turn a sample into an item."""

    task: str = ""

    def __init__(
        self,
        length: int,
        seed: int = 0,
        split: str = "train",
        size: int = 64,
        *,
        require_held_out: bool = False,
    ) -> None:
        if length < 0:
            raise UserInputError(f"dataset length must be >= 0, got {length}")
        check_split(split)
        self.length = length
        self.seed = seed
        self.split = split
        self.size = size
        self.options: dict[str, Any] = (
            {"require_held_out": require_held_out} if require_held_out else {}
        )
        check_size(size)  # fail now on a bad size, not in a worker

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> Any:
        """The structured sample (scenes and texts, no pixels) at ``index``."""
        if not 0 <= index < self.length:
            raise IndexError(
                f"index {index} out of range for a {self.task} dataset of {self.length}"
            )
        return task_sample(self.task, self.seed, index, self.split, **self.options)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.to_item(self.sample(index))

    def to_item(self, sample: Any) -> dict[str, Any]:
        raise NotImplementedError

    def image(self, scene: Scene) -> torch.Tensor:
        return image_tensor(scene, self.size)


class ShapesT2IDataset(ShapesDataset):
    """Text-to-image: {"image" (3, S, S), "text" (fed: canonical or paraphrase), "caption"
    (canonical), "paraphrased", "form", "scene"}. ``paraphrase_prob`` (train only) is the
    chance that "text" is a paraphrase; ``form_weights`` weighs the caption forms (uniform when
    None; a form not named weighs 1)."""

    task = "t2i"

    def __init__(
        self,
        length: int,
        seed: int = 0,
        split: str = "train",
        size: int = 64,
        *,
        paraphrase_prob: float = 0.0,
        require_held_out: bool = False,
        form_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(length, seed, split, size, require_held_out=require_held_out)
        if paraphrase_prob:
            self.options["paraphrase_prob"] = paraphrase_prob
        if form_weights is not None:
            self.options["form_weights"] = dict(form_weights)
        task_sample(self.task, seed, 0, split, **self.options)  # validate options eagerly

    def to_item(self, s: T2ISample) -> dict[str, Any]:
        return {
            "image": self.image(s.scene),
            "text": s.text,
            "caption": s.canonical,
            "paraphrased": s.paraphrased,
            "form": s.form,
            "scene": s.scene,
        }


class ShapesStoryDataset(ShapesDataset):
    """Stories: {"images" (N, 3, S, S) with N in 2..4, "texts" (N), "events" (N-1), "scenes"}."""

    task = "story"

    def to_item(self, s: Story) -> dict[str, Any]:
        return {
            "images": torch.stack([self.image(scene) for scene in s.scenes]),
            "texts": list(s.texts),
            "events": list(s.events),
            "scenes": list(s.scenes),
        }


class ShapesEditDataset(ShapesDataset):
    """Edits: {"source", "target" (3, S, S), "instruction", "event", "source_scene",
    "target_scene"}."""

    task = "edit"

    def to_item(self, s: Edit) -> dict[str, Any]:
        return {
            "source": self.image(s.source),
            "target": self.image(s.target),
            "instruction": s.instruction,
            "event": s.event,
            "source_scene": s.source,
            "target_scene": s.target,
        }


class ShapesSubjectDataset(ShapesDataset):
    """Subjects: {"references" (n, 3, S, S) with n in 3..5, "image" (3, S, S) of the prompt's
    scene, "prompt", "subject" (SubjectIdentity), "reference_scenes", "scene"}."""

    task = "subject"

    def to_item(self, s: SubjectSample) -> dict[str, Any]:
        return {
            "references": torch.stack([self.image(scene) for scene in s.references]),
            "image": self.image(s.scene),
            "prompt": s.prompt,
            "subject": s.subject,
            "reference_scenes": list(s.references),
            "scene": s.scene,
        }


class ShapesVQADataset(ShapesDataset):
    """VQA: {"image" (3, S, S), "question", "answer", "scene"}."""

    task = "vqa"

    def to_item(self, s: VQASample) -> dict[str, Any]:
        return {
            "image": self.image(s.scene),
            "question": s.question,
            "answer": s.answer,
            "scene": s.scene,
        }


DATASETS: dict[str, type[ShapesDataset]] = {
    "t2i": ShapesT2IDataset,
    "story": ShapesStoryDataset,
    "edit": ShapesEditDataset,
    "subject": ShapesSubjectDataset,
    "vqa": ShapesVQADataset,
}


__all__ = [
    "DATASETS",
    "ShapesDataset",
    "ShapesEditDataset",
    "ShapesStoryDataset",
    "ShapesSubjectDataset",
    "ShapesT2IDataset",
    "ShapesVQADataset",
    "collate",
    "image_tensor",
    "tensor_to_uint8",
]
