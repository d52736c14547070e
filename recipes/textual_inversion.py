"""Textual inversion on the ldm path: learn the identifier's embedding from 3-5 images.

Everything of the base model (default: the bundled shapes-ldm) stays frozen but one row
of its text encoder's input embeddings, the identifier's (Gal et al. 2022), trained on
the denoising loss of the subject's images under the prompt ``the sks circle``. The row
starts as the class word's embedding (--init-word to choose another word). The learning
rate is 5e-4: at 5e-3, on shapes-ldm's validation subjects, the row grew to about 4 times
the mean norm of the model's own rows (up to twice the largest) and swamped the rest of the
caption (3 of 24 images with the prompt right, against 8 at 5e-4; docs/results.md,
"Textual inversion's learning rate").

Which row: the shapes-bpe tokenizer already holds ``sks`` as one token (the shapes
world's subject identifier), which shapes-ldm never saw in training (its captions name no
subject). Textual inversion learns *that* token's row, so prompts in the subject grammar
("the sks circle to the left of a blue square") work unchanged. An identifier the
tokenizer does not hold as one token (``--token "<my-circle>"``) is added as a new token
instead, as diffusers' textual_inversion.py does.

The result, OUT/learned_embeds.safetensors, is in diffusers' format ({word: (1, D)}):
``anygen generate ... --embedding OUT`` loads it (replacing the row of an existing token,
adding a new one otherwise); a new-token file also loads with diffusers'
``pipe.load_textual_inversion(OUT)``, which refuses words the tokenizer holds already.

    anygen train recipes/textual_inversion.py --subject-dir DIR --token sks \\
        --class-word circle --output-dir OUT
    anygen generate "the sks circle to the left of a blue square" --embedding OUT --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from anygen.errors import UserInputError
from anygen.models.ldm import tokenize
from anygen.output import write_text_atomic
from anygen.pipelines.embeddings import save_embeddings, single_token_id
from anygen.training import TrainConfig, device_description, train
from anygen.training.subjects import (
    SubjectPairs,
    SubjectTrainer,
    check_positive,
    check_words,
    encode_images,
    instance_prompt,
    load_base_model,
    read_subject_images,
    subject_recipe_parser,
)

log = logging.getLogger("recipes.textual_inversion")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = subject_recipe_parser(
        "textual_inversion.py", __doc__, "the identifier whose embedding is learnt"
    )
    p.add_argument("--init-word", help="the word whose embedding starts the row (class word)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    args = p.parse_args(argv)
    check_positive(p, args, "steps", "batch_size")
    return args


def identifier_row(tokenizer, text_encoder, token: str, init_word: str) -> tuple[int, bool]:
    """(the row the identifier's embedding lives in, whether the token was added), with the
    row set to ``init_word``'s embedding."""
    init = single_token_id(tokenizer, init_word)
    if init is None:
        raise UserInputError(
            f"the initial word {init_word!r} is not one token of the tokenizer; choose a word "
            "it holds whole (the class word usually is)"
        )
    row = single_token_id(tokenizer, token)
    added = row is None
    if added:
        if tokenizer.add_tokens(token) != 1:
            raise UserInputError(f"cannot add the identifier {token!r} to the tokenizer")
        text_encoder.resize_token_embeddings(len(tokenizer))
        row = tokenizer.convert_tokens_to_ids(token)
    table = text_encoder.get_input_embeddings().weight  # (V, D)
    with torch.no_grad():
        table[row] = table[init]
    return row, added


def finetune(args: argparse.Namespace) -> dict:
    """Learn the embedding and write OUT; returns the facts recorded in OUT/training.json."""
    base = load_base_model(args.model)
    c = base.components
    check_words(args.token, args.class_word, base.known_words, args.model)
    size = base.default_size
    references = read_subject_images(args.subject_dir, size)
    prompt = args.instance_prompt or instance_prompt(args.token, args.class_word)
    torch.manual_seed(args.seed)

    c.denoiser.requires_grad_(False)
    c.text_encoder.requires_grad_(False)
    row, added = identifier_row(
        c.tokenizer, c.text_encoder, args.token, args.init_word or args.class_word
    )
    table = c.text_encoder.get_input_embeddings().weight  # (V, D)
    learns = torch.zeros(len(table), 1)
    learns[row] = 1.0
    table.requires_grad_(True)
    # Only the identifier's row learns: every other row's gradient is zeroed, so that
    # AdamW (no weight decay) never moves it, and every checkpoint holds the table as it is.
    table.register_hook(lambda grad: grad * learns.to(grad.device, grad.dtype))

    instance = encode_images(c.vae, references, size)
    data = SubjectPairs(instance, tokenize(c.tokenizer, [prompt])[0])
    trainer = SubjectTrainer(
        c.denoiser, c.text_encoder, c.scheduler, prior_weight=0.0, snr_gamma=args.snr_gamma
    )
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
    started = time.perf_counter()
    result = train(
        trainer,
        lambda model, batch: model(batch),
        data,
        config,
        trainable_parameters=[table],
    )
    train_s = time.perf_counter() - started
    if not result.is_main_process:
        return {}
    learned = result.model.text_encoder.get_input_embeddings().weight[row].detach()
    file = save_embeddings(args.output_dir, {args.token: learned[None]})
    facts = {
        "recipe": "recipes/textual_inversion.py",
        "base_model": args.model,
        "subject_dir": str(args.subject_dir),
        "references": len(references),
        "instance_prompt": prompt,
        "token": args.token,
        "token_added": added,
        "init_word": args.init_word or args.class_word,
        "class_word": args.class_word,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "seed": args.seed,
        "snr_gamma": args.snr_gamma,
        "final_loss": result.loss,
        "train_s": round(train_s, 1),
        "embedding_file": file.name,
        "embedding_kb": round(file.stat().st_size / 1024, 1),
        "device": device_description(),
        "torch": torch.__version__,
    }
    write_text_atomic(args.output_dir / "training.json", json.dumps(facts, indent=2) + "\n")
    write_text_atomic(args.output_dir / "README.md", card(facts))
    log.info("saved %s after %.0f s of training", file, train_s)
    return facts


def card(facts: dict) -> str:
    front = "\n".join(f"{k}: {json.dumps(v)}" for k, v in facts.items())
    row = "a new token" if facts["token_added"] else "the tokenizer's own token"
    return f"""---
{front}
---
# Textual inversion: `{facts["token"]}` ({facts["class_word"]})

The input embedding of `{facts["token"]}` ({row}, started from `{facts["init_word"]}`) for
`{facts["base_model"]}`, learnt by `{facts["recipe"]}` from {facts["references"]} reference
images for {facts["steps"]} steps (batch {facts["batch_size"]}, lr {facts["learning_rate"]},
seed {facts["seed"]}) in {facts["train_s"]} s on {facts["device"]}.

    anygen generate "{facts["instance_prompt"]} to the left of a blue square" --model {facts["base_model"]} --embedding THIS_FOLDER
"""


def main(argv: list[str]) -> None:
    finetune(parse_args(argv))
