"""DreamBooth with LoRA on the ldm path: teach a base model one subject from 3-5 images.

The denoiser of the base model (default: the bundled shapes-ldm's UNet; a DiT such as
shapes-dit's PixArt transformer too) gets peft LoRA adapters on its attention projections
(rank 4, as diffusers' train_dreambooth_lora.py); only they train, on the denoising loss of the subject's images under the instance prompt
``the sks circle`` plus, for prior preservation (Ruiz et al. 2023), the loss of class
images under their prompts, weighted by --prior-weight (0 turns it off).

Class images are *generated* by the base model by default, as DreamBooth does: the prior
loss then holds the model to what it drew for the class before, so prompts without the
identifier keep their behaviour. --class-images rendered uses shapes-world renders of the
same prompts instead; that is ground truth rather than the model's prior, so it also
teaches the class, a second effect mixed into what the recipe measures (kept as an
option for comparison). The prompts are shapes-world captions of one plain object of the
class ("a small red circle in the top left"), the grammar the base model was trained on
(a class word outside the shapes world gets DreamBooth's "a CLASS-WORD");
--class-prompt "a circle" gives one class prompt of your choice instead.

The denoising loss is Min-SNR weighted (gamma 5, as shapes-ldm was trained); --snr-gamma
none gives the plain loss of diffusers' script. --lora-targets all adapts the UNet's block
linears and convolutions as well (LoCon-style), room for a texture the base never drew.
On shapes-ldm's validation subjects neither --snr-gamma none nor 1,000 steps at rank 16
and lr 1e-3 beat these defaults by the margin set before the study, and --lora-targets all
did worse than the latter on the one subject it was tried on (docs/results.md,
"DreamBooth-LoRA's settings").

The result, OUT/pytorch_lora_weights.safetensors (diffusers' LoRA format, with the
adapter config in its metadata), loads onto the base model with --lora, several at once
with scales; OUT/README.md records the recipe, seed, steps, time and device.

    anygen data shapes --task subject --n 1 --split test --output-dir refs   # or any images
    anygen train recipes/dreambooth_lora.py --subject-dir DIR --token sks \\
        --class-word circle --output-dir OUT
    anygen generate "the sks circle to the left of a blue square" --lora OUT --seed 0
    anygen generate "the sks circle" --lora OUT:0.7 --lora OTHER:0.5
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from anygen.models.ldm import tokenize
from anygen.output import write_text_atomic
from anygen.pipelines.lora import (
    TEXT_ENCODER_LORA_TARGETS,
    UNET_LORA_TARGETS,
    UNET_LORA_TARGETS_ALL,
    add_lora,
    save_lora,
)
from anygen.training import TrainConfig, device_description, train
from anygen.training.subjects import (
    SubjectPairs,
    SubjectTrainer,
    cached_class_images,
    check_positive,
    check_words,
    encode_images,
    instance_prompt,
    load_base_model,
    read_subject_images,
    subject_recipe_parser,
)

log = logging.getLogger("recipes.dreambooth_lora")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = subject_recipe_parser(
        "dreambooth_lora.py", __doc__, "the identifier that names the subject"
    )
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument(
        "--lora-targets",
        choices=("attention", "all"),
        default="attention",
        help="the denoiser's layers adapted: the attention projections (diffusers' "
        "DreamBooth-LoRA), or all its block linears and convolutions too",
    )
    p.add_argument("--train-text-encoder", action="store_true", help="LoRA on the text encoder too")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4, help="instance images per step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--prior-weight", type=float, default=1.0, help="0: no prior preservation")
    p.add_argument("--class-images", choices=("generated", "rendered"), default="generated")
    p.add_argument("--num-class-images", type=int, default=50)
    p.add_argument("--class-prompt", help="one prompt for every class image (generated)")
    p.add_argument(
        "--class-dir", type=Path, help="where class images are kept (default OUT/class-images)"
    )
    args = p.parse_args(argv)
    check_positive(p, args, "steps", "batch_size", "rank")
    if args.prior_weight < 0:
        p.error("--prior-weight must be >= 0")
    if args.prior_weight > 0 and args.num_class_images < 1:
        p.error("--num-class-images must be >= 1 with prior preservation")
    return args


def finetune(args: argparse.Namespace) -> dict:
    """Train the LoRA and write OUT; returns the facts recorded in OUT/training.json."""
    base = load_base_model(args.model)
    c = base.components
    check_words(args.token, args.class_word, base.known_words, args.model)
    size = base.default_size
    references = read_subject_images(args.subject_dir, size)
    prompt = args.instance_prompt or instance_prompt(args.token, args.class_word)
    torch.manual_seed(args.seed)

    started = time.perf_counter()
    prior = prior_ids = None
    if args.prior_weight > 0:
        classes = cached_class_images(
            args.class_dir or args.output_dir / "class-images",
            base,
            args.model,
            args.class_word,
            args.num_class_images,
            args.seed,
            args.class_images,
            args.class_prompt,
        )
        prior = encode_images(c.vae, classes.images, size)
        prior_ids = tokenize(c.tokenizer, classes.prompts)
    class_s = time.perf_counter() - started

    instance = encode_images(c.vae, references, size)
    targets = UNET_LORA_TARGETS_ALL if args.lora_targets == "all" else UNET_LORA_TARGETS
    params = add_lora(c.denoiser, args.rank, targets)
    c.text_encoder.requires_grad_(False)
    if args.train_text_encoder:
        params += add_lora(c.text_encoder, args.rank, TEXT_ENCODER_LORA_TARGETS)
    trainer = SubjectTrainer(
        c.denoiser, c.text_encoder, c.scheduler, args.prior_weight, args.snr_gamma
    )
    data = SubjectPairs(instance, tokenize(c.tokenizer, [prompt])[0], prior, prior_ids)
    config = TrainConfig(
        output_dir=args.output_dir / "train",
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        checkpoint_every=args.checkpoint_every,
        keep_last_checkpoints=1,
        log_every=max(1, min(25, args.steps)),
        mixed_precision=args.mixed_precision,
        seed=args.seed,
        resume="latest" if args.resume else None,
    )
    train_start = time.perf_counter()
    result = train(
        trainer, lambda model, batch: model(batch), data, config, trainable_parameters=params
    )
    train_s = time.perf_counter() - train_start
    if not result.is_main_process:
        return {}
    denoiser, text_encoder = result.model.denoiser, result.model.text_encoder
    file = save_lora(args.output_dir, denoiser, text_encoder if args.train_text_encoder else None)
    facts = {
        "recipe": "recipes/dreambooth_lora.py",
        "base_model": args.model,
        "subject_dir": str(args.subject_dir),
        "references": len(references),
        "instance_prompt": prompt,
        "token": args.token,
        "class_word": args.class_word,
        "rank": args.rank,
        "lora_targets": args.lora_targets,
        "denoiser": type(c.denoiser).__name__,
        "train_text_encoder": args.train_text_encoder,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "prior_weight": args.prior_weight,
        "class_images": args.class_images if args.prior_weight > 0 else None,
        "num_class_images": args.num_class_images if args.prior_weight > 0 else 0,
        "seed": args.seed,
        "snr_gamma": args.snr_gamma,
        "final_loss": result.loss,
        "class_images_s": round(class_s, 1),
        "train_s": round(train_s, 1),
        "lora_file": file.name,
        "lora_kb": round(file.stat().st_size / 1024, 1),
        "device": device_description(),
        "torch": torch.__version__,
    }
    write_text_atomic(args.output_dir / "training.json", json.dumps(facts, indent=2) + "\n")
    write_text_atomic(args.output_dir / "README.md", card(facts))
    log.info("saved %s (%.1f KB) after %.0f s of training", file, facts["lora_kb"], train_s)
    return facts


def card(facts: dict) -> str:
    prior = (
        f"prior preservation with {facts['num_class_images']} {facts['class_images']} class "
        f"images, weight {facts['prior_weight']}"
        if facts["prior_weight"]
        else "no prior preservation"
    )
    kind = "DiT" if facts["denoiser"].startswith("PixArt") else "UNet"
    layers = {
        "attention": f"{kind} attention projections",
        "all": f"{kind} attention projections, block linears and convolutions",
    }[facts["lora_targets"]]
    front = "\n".join(f"{k}: {json.dumps(v)}" for k, v in facts.items())
    return f"""---
{front}
---
# DreamBooth-LoRA: `{facts["instance_prompt"]}`

LoRA (rank {facts["rank"]}, {layers}{" and text encoder" if facts["train_text_encoder"] else ""})
on `{facts["base_model"]}`, trained by `{facts["recipe"]}` from {facts["references"]} reference
images for {facts["steps"]} steps (batch {facts["batch_size"]}, lr {facts["learning_rate"]},
seed {facts["seed"]}), {prior}. Training took {facts["train_s"]} s on {facts["device"]}
(class images {facts["class_images_s"]} s).

    anygen generate "{facts["instance_prompt"]} to the left of a blue square" --model {facts["base_model"]} --lora THIS_FOLDER
"""


def main(argv: list[str]) -> None:
    finetune(parse_args(argv))
