"""``anygen eval --model M --suite S``: plug a loaded generator into a shapes-eval suite.

The suites take plain callables (``anygen.eval.suites``); this module makes those
callables from a generator's capabilities and says clearly when a model lacks one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from anygen.errors import UserInputError
from anygen.eval.suites import (
    Report,
    _check_batch_size,
    _check_n,
    run_caption,
    run_edit,
    run_reconstruction,
    run_story,
    run_subject,
    run_t2i,
)
from anygen.pipelines import Generator, Options, load_generator

log = logging.getLogger(__name__)

# suite -> the generator method it needs
NEEDS = {
    "t2i": "generate_batch",
    "caption": "caption",
    "story": "story",
    "edit": "edit",
    "subject": "generate_subject",
    "reconstruction": "encode",  # image tokenizers and ldm VAEs: decode(encode(x))
}


# what ``candidates`` ranks in a suite, and by what score
RANKED = {
    "story": {"ranked": "opening picture", "by": "caption"},  # later pictures: drawn once
    "caption": {"ranked": "captions", "by": "image likelihood"},  # log p(codes | caption)
}


def evaluate_model(
    model: str,
    suite: str,
    *,
    n: int = 100,
    seed: int = 0,
    batch_size: int = 16,
    device: str | None = None,
    dtype: str | None = None,
    options: Options | None = None,
    progress: bool = True,
    wrap: Callable[[Generator], Generator] | None = None,
    candidates: int = 1,
) -> Report:
    """Load ``model`` and score it on ``suite`` (t2i, caption, story, edit, subject; or
    reconstruction, for an image tokenizer or an ldm model's VAE). ``wrap`` turns the
    loaded generator into the one scored (``anygen.pipelines.rerank.rerank``: best of K);
    ``candidates`` > 1, ranked by the model itself: each story's opening picture the best
    of that many (story suite; ``anygen.pipelines.story``), or each caption (caption suite,
    ``Fusion.best_captions``; the VQA answers are not ranked)."""
    if suite not in NEEDS:
        raise UserInputError(f"unknown suite {suite!r}; choose one of {', '.join(NEEDS)}")
    _check_n(n)  # before a model that may take minutes to load
    _check_batch_size(batch_size)
    if candidates != 1 and suite not in RANKED:
        raise UserInputError(
            f"candidates apply to the story and caption suites, not to {suite}; a t2i model "
            "is reranked by wrap (anygen.pipelines.rerank.rerank)"
        )
    if suite == "reconstruction":
        report = _reconstruction(
            model, n=n, seed=seed, batch_size=batch_size, device=device, progress=progress
        )
        report.meta = {"model": model, "suite": suite, "n": n, "seed": seed}
        return report
    gen = load_generator(model, device=device, dtype=dtype)
    if wrap is not None:
        gen = wrap(gen)
    if not hasattr(gen, NEEDS[suite]):
        family = getattr(gen, "family", type(gen).__name__)
        hint = (
            "; DreamBooth-LoRA and textual inversion fine-tune per subject: "
            "benchmarks/subject_bench.py scores them on this suite's subjects"
            if suite == "subject" and family == "ldm"
            else ""
        )
        raise UserInputError(
            f"model {model!r} ({family}) cannot run the {suite} suite: it has no "
            f"{NEEDS[suite]}(){hint}"
        )
    opts = options or Options()
    opts.progress = False

    def seeded(s: int) -> Options:
        return dataclasses.replace(opts, seed=s)

    log.info("evaluating %s on the %s suite (n=%d, seed=%d)", model, suite, n, seed)
    if suite == "t2i":

        def generate_fn(prompts, seeds):
            return gen.generate_batch(prompts, seeds, opts).images

        report = run_t2i(generate_fn, n=n, seed=seed, batch_size=batch_size, progress=progress)
    elif suite == "caption":
        answer = getattr(gen, "answer", None)
        if candidates > 1 and not callable(getattr(gen, "best_captions", None)):
            raise UserInputError(f"model {model!r} cannot rank its captions")

        # image i of the suite is seeded seed + i (sampled text, ranked candidates), as in t2i
        done = {"caption": 0, "vqa": 0}

        def next_seed(task: str, count: int) -> Options:
            first = seed + done[task]
            done[task] += count
            return seeded(first)

        def caption_fn(images):
            batch_opts = next_seed("caption", len(images))
            if candidates == 1:
                return gen.caption(images, batch_opts)
            return [text for text, _, _ in gen.best_captions(images, candidates, batch_opts)]

        def vqa_fn(images, questions):
            return answer(images, questions, next_seed("vqa", len(images)))

        report = run_caption(
            caption_fn,
            vqa_fn if answer else None,
            n=n,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
        )
    elif suite == "story":
        report = run_story(
            lambda prompt, scenes, s: gen.story(prompt, scenes, s, opts, candidates=candidates),
            n=n,
            seed=seed,
            progress=progress,
        )
    elif suite == "edit":
        report = run_edit(
            lambda image, instruction, s: gen.edit(image, instruction, seeded(s)).images[0],
            n=n,
            seed=seed,
            progress=progress,
        )
    else:
        report = run_subject(
            lambda refs, prompt, s: gen.generate_subject(refs, prompt, seeded(s)).images[0],
            n=n,
            seed=seed,
            progress=progress,
        )
    # the options' own seed is replaced per prompt (``seeded``); the report's is the prompt set's
    report.meta = {**opts.to_dict(), "model": model, "suite": suite, "n": n, "seed": seed}
    from anygen.pipelines.rerank import Reranked, candidate_sampling

    if candidates > 1:
        report.meta["rerank"] = {"candidates": candidates, **RANKED[suite], "scorer": gen.name}
        if suite == "story":  # the opening picture's settings, where the options left gaps
            report.meta["rerank"]["sampling"] = candidate_sampling(gen)
        else:
            report.meta["rerank"]["temperature"] = (
                opts.temperature
                if opts.temperature is not None
                else gen.defaults["caption_candidate_temperature"]
            )
    if isinstance(gen, Reranked):
        report.meta["rerank"] = {
            "candidates": gen.candidates,
            "by": gen.by,
            "scorer": gen.scorer.name,
            "sampling": gen.sampling,  # the model's rerank defaults, where options left gaps
        }
    return report


def _reconstruction(
    model: str, *, n: int, seed: int, batch_size: int, device: str | None, progress: bool = True
) -> Report:
    """decode(encode(x)) through an image tokenizer, a visual codec (``shapes-emu``'s
    ``visual/``: through its embeddings and diffusion decoder), or the VAE of an ``ldm``
    pipeline directory (the latent distribution's mode: what its denoiser learnt)."""
    import torch

    from anygen.data.datasets import images_to_tensor, tensor_to_images
    from anygen.hub import CONFIG_NAME, resolve, saved_class_name
    from anygen.pipelines import pick_device
    from anygen.tokenizers.vq import load_image_tokenizer

    dev = pick_device(device)
    path = resolve(model)
    if (path / "model_index.json").is_file():
        from anygen.pipelines.text_to_image import LatentDiffusion

        vae = LatentDiffusion.from_pretrained(path, device=dev).components.vae
        size = int(vae.config.sample_size)

        @torch.no_grad()
        def roundtrip(images):
            x = images_to_tensor(images).to(dev, vae.dtype)
            return tensor_to_images(vae.decode(vae.encode(x).latent_dist.mode()).sample.float())

    elif (path / CONFIG_NAME).is_file() and saved_class_name(path, "") == "VisualCodec":
        from anygen.tokenizers.visual import load_visual_codec

        codec = load_visual_codec(path, device=dev)
        size, roundtrip = codec.image_size, codec_roundtrip(codec, seed)
    else:
        tok = load_image_tokenizer(path, device=dev)
        size = tok.image_size

        def roundtrip(images):
            return tensor_to_images(tok.decode(tok.encode(images_to_tensor(images).to(dev))))

    return run_reconstruction(
        roundtrip, n=n, seed=seed, batch_size=batch_size, size=size, progress=progress
    )


def codec_roundtrip(codec, seed: int = 0) -> Callable:
    """decode(encode(x)) through a ``VisualCodec``'s embeddings; the decoder's noise for
    the k-th image of the run is seeded ``seed * 100_003 + k``."""
    import torch

    from anygen.data.datasets import images_to_tensor, tensor_to_images

    codec.eval()
    done = [0]

    @torch.no_grad()
    def roundtrip(images):
        x = images_to_tensor(images).to(codec.unet.device)
        gens = [torch.Generator().manual_seed(seed * 100_003 + done[0] + i) for i in range(len(x))]
        done[0] += len(x)
        return tensor_to_images(codec.decode(codec.encode(x), gens).float())

    return roundtrip
