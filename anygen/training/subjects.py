"""What the subject recipes (DreamBooth-LoRA, textual inversion) share.

A subject is taught from a folder of 3 to 5 reference images and named in prompts by a
rare identifier before its class word, ``the sks circle`` (the shapes world's subject
grammar). This module reads the folder, checks the words, builds the prompts, encodes
images to latents once (the VAE is frozen in both recipes), and holds the dataset and
the module whose forward is the loss; the recipes in ``recipes/`` put them together.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.utils.data import Dataset

from anygen.data.datasets import images_to_tensor
from anygen.errors import UserInputError
from anygen.models.ldm import denoiser_loss

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def subject_recipe_parser(recipe: str, doc: str, token_help: str) -> argparse.ArgumentParser:
    """The options every subject recipe shares: its images, identifier, class, base model,
    output and the training loop's seed, checkpoints, precision and resume."""
    p = argparse.ArgumentParser(
        prog=f"anygen train recipes/{recipe}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--subject-dir", type=Path, required=True, help="the subject's images")
    p.add_argument("--token", default="sks", help=token_help)
    p.add_argument("--class-word", required=True, help="the subject's class, e.g. circle")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--model", default="shapes-ldm", help="base ldm model (name or directory)")
    p.add_argument("--instance-prompt", help="default: 'the TOKEN CLASS-WORD'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train's checkpoint")
    p.add_argument(
        "--snr-gamma",
        type=snr_gamma,
        default=5.0,
        help="Min-SNR weighting of the denoising loss (gamma); 'none': the plain loss, "
        "whose weight grows at low noise, where a subject's fine detail is drawn",
    )
    return p


def snr_gamma(text: str) -> float | None:
    """``--snr-gamma``: a positive number, or ``none`` for the unweighted loss."""
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (or 'none'), got {text!r}")
    return value


def check_positive(p: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Exit through ``p.error`` naming the first of ``names`` below 1."""
    for name in names:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")


def load_base_model(name: str):
    """The base ``LatentDiffusion`` to fine-tune (its denoiser a UNet or a PixArt DiT), in
    fp32 on the best device."""
    from anygen.pipelines import load_generator
    from anygen.pipelines.text_to_image import LatentDiffusion

    model = load_generator(name, dtype="fp32")  # trained in fp32; --mixed-precision for AMP
    if not isinstance(model, LatentDiffusion):
        raise UserInputError(
            f"{name} is a {getattr(model, 'family', type(model).__name__)} model; the subject "
            "recipes fine-tune an ldm (Stable-Diffusion-family) model"
        )
    return model


def read_subject_images(directory: str | Path, size: int) -> list[Image.Image]:
    """The subject's reference images in ``directory`` (sorted by name), each centre-cropped
    to a square and resized to ``size`` (as diffusers' DreamBooth script prepares them)."""
    directory = Path(directory)
    if not directory.exists():
        raise UserInputError(f"subject directory {directory} does not exist")
    if not directory.is_dir():
        raise UserInputError(f"subject directory {directory} is not a directory")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserInputError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) in the subject directory {directory}"
        )
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                image = image.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise UserInputError(f"cannot read subject image {file}: {e}") from None
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        if image.size != (size, size):
            log.info("subject image %s: %s resized to %d px", file.name, image.size, size)
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        images.append(image)
    return images


def check_words(token: str, class_word: str, known_words: set[str] | None, model: str) -> None:
    """The identifier and the class word are single words, different, and the class word
    is one the base model knows (when it records the words it knows)."""
    for label, word in (("identifier (--token)", token), ("class word", class_word)):
        if not word or len(word.split()) != 1:
            raise UserInputError(f"the {label} must be one word, got {word!r}")
    if token == class_word:
        raise UserInputError(f"the identifier and the class word are both {token!r}")
    if known_words is not None and class_word not in known_words:
        raise UserInputError(
            f"unknown class word {class_word!r}: the base model {model} knows no such word "
            f"(it knows: {' '.join(sorted(known_words))})"
        )


def instance_prompt(token: str, class_word: str) -> str:
    """The prompt of the reference images, in the shapes world's subject grammar."""
    return f"the {token} {class_word}"


def shapes_class_scenes(class_word: str, n: int, seed: int) -> list:
    """``n`` train-split shapes-world (caption, scene) pairs of one plain object of the shape
    ``class_word`` ("a small red circle in the top left"): the class prompts, and what the
    renderer draws for them."""
    from anygen.data import shapes
    from anygen.data.world import SHAPES

    if class_word not in SHAPES:
        raise UserInputError(
            f"class word {class_word!r} is not a shape of the shapes world ({', '.join(SHAPES)})"
        )
    out, i = [], 0
    while len(out) < n:
        rng = shapes.sample_rng(seed, "dreambooth-class", i)
        caption, scene = shapes.sample_captioned_scene(
            rng, "train", rng.choice(["object", "position"])
        )
        if scene.objects[0].shape == class_word:
            out.append((caption.text(), scene))
        i += 1
    return out


@torch.no_grad()
def encode_images(vae, images: list[Image.Image], size: int, batch: int = 32) -> torch.Tensor:
    """(N, 2C, h, w): the VAE posterior's mean and std, concatenated on channels, scaled by
    the VAE's scaling factor; ``sample_latents`` draws from it at each step."""
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    pixels = images_to_tensor(images, size)  # (N, 3, S, S)
    out = []
    for i in range(0, len(pixels), batch):
        dist = vae.encode(pixels[i : i + batch].to(device, dtype)).latent_dist
        out.append(torch.cat([dist.mean, dist.std], dim=1).float().cpu())
    return torch.cat(out) * vae.config.scaling_factor


def sample_latents(moments: torch.Tensor) -> torch.Tensor:
    """(B, 2C, h, w) mean and std -> (B, C, h, w) latents drawn from the posterior."""
    mean, std = moments.chunk(2, dim=1)
    return mean + std * torch.randn_like(std)


class SubjectPairs(Dataset):
    """Every (instance image, class image) pair, repeated to at least ``min_length`` items:
    {"instance" (2C, h, w), "instance_ids" (L,)} plus {"prior", "prior_ids"} when class
    images are given (prior preservation)."""

    def __init__(
        self,
        instance: torch.Tensor,
        instance_ids: torch.Tensor,
        prior: torch.Tensor | None = None,
        prior_ids: torch.Tensor | None = None,
        min_length: int = 64,
    ) -> None:
        if prior is not None and (prior_ids is None or len(prior) != len(prior_ids)):
            raise UserInputError("class images and class prompts differ in number")
        self.instance, self.instance_ids = instance, instance_ids
        self.prior, self.prior_ids = prior, prior_ids
        self.pairs = len(instance) * (len(prior) if prior is not None else 1)
        self.length = self.pairs * max(1, math.ceil(min_length / self.pairs))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        j = index % self.pairs
        i, k = j % len(self.instance), j // len(self.instance)
        item = {"instance": self.instance[i], "instance_ids": self.instance_ids}
        if self.prior is not None:
            item.update(prior=self.prior[k], prior_ids=self.prior_ids[k])
        return item


class SubjectTrainer(nn.Module):
    """The denoising loss of the subject's images under the instance prompt, plus
    ``prior_weight`` times that of the class images under their prompts (DreamBooth's
    prior preservation, Ruiz et al. 2023). What trains (LoRA adapters, or one embedding
    row) is set on the modules before; the VAE is not here: latents are precomputed."""

    def __init__(
        self,
        denoiser: nn.Module,
        text_encoder: nn.Module,
        scheduler,
        prior_weight: float,
        snr_gamma: float | None = 5.0,
    ):
        super().__init__()
        self.denoiser, self.text_encoder = denoiser, text_encoder
        self.scheduler = scheduler
        self.prior_weight = prior_weight
        self.snr_gamma = snr_gamma

    def forward(self, batch: dict) -> dict:
        inst = denoiser_loss(
            self.denoiser,
            self.text_encoder,
            self.scheduler,
            sample_latents(batch["instance"]),
            batch["instance_ids"],
            snr_gamma=self.snr_gamma,
        )["loss"]
        if "prior" not in batch or not self.prior_weight:
            return {"loss": inst}
        prior = denoiser_loss(
            self.denoiser,
            self.text_encoder,
            self.scheduler,
            sample_latents(batch["prior"]),
            batch["prior_ids"],
            snr_gamma=self.snr_gamma,
        )["loss"]
        return {"loss": inst + self.prior_weight * prior, "instance": inst, "prior": prior}


@dataclass
class ClassImages:
    prompts: list[str]
    images: list[Image.Image]
    source: str  # "generated" | "rendered"


def class_images(
    model, class_word: str, n: int, seed: int, source: str, class_prompt: str | None = None
) -> ClassImages:
    """``n`` class images for prior preservation and their prompts.

    ``generated`` (DreamBooth's choice): drawn by the base ``model`` itself, so the prior
    loss holds the model to what it did before for the class. ``rendered``: the shapes
    world's own pictures of the same prompts (the truth, not the model's prior: it also
    teaches the class, which mixes a second effect into what the recipe measures).
    Prompts: ``class_prompt`` for all; else, for a shape of the shapes world, captions of
    one plain object of the class (``shapes_class_scenes``: the grammar the shapes models
    were trained on, where a bare "a circle" never occurs); else DreamBooth's
    ``a CLASS-WORD``. Rendered images need a shapes-world class and its captions.
    """
    from anygen.data.render import render_image
    from anygen.data.world import SHAPES
    from anygen.pipelines import Options

    if source not in ("generated", "rendered"):
        raise UserInputError(f"class images are 'generated' or 'rendered', got {source!r}")
    if source == "rendered":
        if class_prompt is not None:
            raise UserInputError("--class-prompt applies to generated class images only")
        pairs = shapes_class_scenes(class_word, n, seed)
        size = model.default_size
        return ClassImages([p for p, _ in pairs], [render_image(s, size) for _, s in pairs], source)
    if class_prompt is not None:
        prompts = [class_prompt] * n
    elif class_word in SHAPES:
        prompts = [p for p, _ in shapes_class_scenes(class_word, n, seed)]
    else:
        prompts = [f"a {class_word}"] * n
    seeds = [random.Random(f"class/{seed}/{i}").randrange(2**31) for i in range(n)]
    images = []
    for i in range(0, n, 16):
        out = model.generate_batch(prompts[i : i + 16], seeds[i : i + 16], Options(progress=False))
        images.extend(out.images)
    return ClassImages(prompts, images, source)


CLASS_INDEX = "index.jsonl"


def cached_class_images(
    directory: str | Path,
    model,
    model_name: str,
    class_word: str,
    n: int,
    seed: int,
    source: str,
    class_prompt: str | None = None,
) -> ClassImages:
    """``class_images``, kept in ``directory`` (PNGs and ``index.jsonl``) and reused by a
    later run that asks for the same ones (same model, class, number, seed and source):
    one subject after another of one class then draws them once."""
    import json

    from anygen.hub import atomic_directory

    directory = Path(directory)
    key = {
        "model": model_name,
        "class_word": class_word,
        "seed": seed,
        "source": source,
        "class_prompt": class_prompt,
    }
    index = directory / CLASS_INDEX
    if index.is_file():
        rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
        if len(rows) >= n and all({k: r.get(k) for k in key} == key for r in rows[:n]):
            images = []
            for r in rows[:n]:
                with Image.open(directory / r["file"]) as image:
                    images.append(image.convert("RGB"))
            log.info("reusing %d %s class images from %s", n, source, directory)
            return ClassImages([r["prompt"] for r in rows[:n]], images, source)
    made = class_images(model, class_word, n, seed, source, class_prompt)
    with atomic_directory(directory, marker=CLASS_INDEX, keep_other_files=False) as tmp:
        rows = []
        for i, (prompt, image) in enumerate(zip(made.prompts, made.images, strict=True)):
            name = f"{i:04d}.png"
            image.save(tmp / name)
            rows.append(json.dumps({"file": name, "prompt": prompt, **key}))
        (tmp / CLASS_INDEX).write_text("\n".join(rows) + "\n")
    return made
