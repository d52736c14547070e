"""Embedding similarities of DreamBench (Ruiz et al. 2023): CLIP-I, CLIP-T and DINO.

- CLIP-I: mean cosine similarity between CLIP image embeddings of generated images and of
  the subject's reference images;
- CLIP-T: cosine similarity between the CLIP embeddings of a generated image and of its
  prompt (with the identifier left out: ``the sks circle`` is scored as ``the circle``);
- DINO: mean cosine similarity between DINO ViT embeddings (the [CLS] token of the last
  layer) of generated and reference images; it tells subjects apart better than CLIP-I.

The encoders are whatever the user supplies: a CLIP checkpoint (``CLIPModel`` with its
processor, e.g. openai/clip-vit-base-patch32) and a DINO one (``Dinov2Model`` or
``ViTModel`` with its image processor, e.g. facebook/dino-vits16), as a directory or a hub
id already in the cache. Nothing is downloaded unless the hub is reachable and allowed.
Weights load from safetensors only, without remote code. transformers is imported lazily.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from PIL import Image

from anygen.errors import CheckpointError, UserInputError, load_errors

log = logging.getLogger(__name__)


def _load(path: str | os.PathLike, what: str):
    """(model, processor) of a transformers checkpoint ``path``."""
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor, CLIPModel

    from anygen.hub import resolve

    folder = resolve(path)
    try:
        if what == "CLIP":
            model = CLIPModel.from_pretrained(folder, use_safetensors=True)
            processor = AutoProcessor.from_pretrained(folder)
        else:
            model = AutoModel.from_pretrained(folder, use_safetensors=True)
            processor = AutoImageProcessor.from_pretrained(folder)
    except load_errors() as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load the {what} model in {folder}: {first}") from None
    return model.eval(), processor


def _features(output) -> torch.Tensor:
    """``get_*_features`` return a tensor (transformers 4) or an output whose pooler
    output is the projected embedding (transformers 5)."""
    return output if torch.is_tensor(output) else output.pooler_output


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) cosine similarities."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


def _check_images(images: Sequence[Image.Image], label: str) -> list[Image.Image]:
    if not images:
        raise UserInputError(f"no {label} images to embed")
    return [im.convert("RGB") for im in images]


class ClipSimilarity:
    """CLIP-I and CLIP-T with a user-supplied CLIP checkpoint."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model, self.processor = _load(path, "CLIP")
        self.model.to(self.device)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) image embeddings."""
        inputs = self.processor(images=_check_images(images, "CLIP"), return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.model.dtype)
        return _features(self.model.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) text embeddings."""
        inputs = self.processor(text=list(texts), return_tensors="pt", padding=True)
        inputs = {
            k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")
        }
        return _features(self.model.get_text_features(**inputs))

    def image_similarity(
        self, generated: Sequence[Image.Image], references: Sequence[Image.Image]
    ) -> float:
        """CLIP-I: mean cosine over every (generated, reference) pair."""
        return float(
            cosine_matrix(
                self.image_embeddings(generated), self.image_embeddings(references)
            ).mean()
        )

    def text_similarity(self, images: Sequence[Image.Image], texts: Sequence[str]) -> float:
        """CLIP-T: mean cosine of each image with its own text."""
        if len(images) != len(texts):
            raise UserInputError(f"{len(images)} images but {len(texts)} texts")
        sims = cosine_matrix(self.image_embeddings(images), self.text_embeddings(texts))
        return float(sims.diagonal().mean())


# transformers model types whose [CLS] token DINO scores read (DINO v1 checkpoints are ViTs)
DINO_MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers", "dinov3_vit")


class DinoSimilarity:
    """DINO: cosine of [CLS] embeddings with a user-supplied DINO (v1 ViT or v2) model."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model, self.processor = _load(path, "DINO")
        kind = getattr(self.model.config, "model_type", None)
        if kind not in DINO_MODEL_TYPES:
            raise CheckpointError(
                f"{path} holds a {kind!r} model, not a DINO one (a ViT or DINOv2: "
                f"{', '.join(DINO_MODEL_TYPES)})"
            )
        self.model.to(self.device)

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D): the [CLS] token of the last hidden layer."""
        inputs = self.processor(images=_check_images(images, "DINO"), return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.model.dtype)
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]

    def image_similarity(
        self, generated: Sequence[Image.Image], references: Sequence[Image.Image]
    ) -> float:
        """DINO score: mean cosine over every (generated, reference) pair."""
        return float(
            cosine_matrix(
                self.image_embeddings(generated), self.image_embeddings(references)
            ).mean()
        )


def without_identifier(prompt: str, identifier: str) -> str:
    """The prompt as CLIP-T reads it: ``the sks circle`` -> ``the circle``."""
    return " ".join(w for w in prompt.split() if w != identifier)
