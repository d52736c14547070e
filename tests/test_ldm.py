"""The ldm path with tiny random components: parity with diffusers, save/load, CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from anygen.cli import main as cli
from anygen.errors import UserInputError
from anygen.hub import bundled_models, resolve
from anygen.models.ldm import LDM_PRESETS, SCHEDULERS, build_components
from anygen.output import read_png_metadata
from anygen.pipelines import Options, load_generator
from anygen.pipelines.text_to_image import LatentDiffusion
from anygen.tokenizers.text import load_text_tokenizer

OPTS = dict(steps=3, guidance_scale=3.0, progress=False)


def tiny(denoiser: str = "unet", seed: int = 0) -> LatentDiffusion:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(LDM_PRESETS["tiny"], denoiser=denoiser)
    components = build_components(cfg, load_text_tokenizer("shapes-bpe"))
    return LatentDiffusion(
        components, name="tiny", defaults={"known_words": ["a", "red", "circle"]}
    )


@pytest.fixture(scope="module")
def model() -> LatentDiffusion:
    return tiny()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return model.save_pretrained(tmp_path_factory.mktemp("ldm") / "tiny-ldm")


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(i) for i in images]).astype(np.int16)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_equals_diffusers_stable_diffusion_pipeline(model, scheduler):
    """Same components, scheduler and seeds: the same pixels as diffusers' own pipeline."""
    ours = model.generate(
        "a red circle",
        Options(seed=5, num_images=2, negative_prompt="blue", scheduler=scheduler, **OPTS),
    )
    pipe = model.to_diffusers()
    pipe.scheduler = model.sampler(scheduler)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        "a red circle",
        negative_prompt="blue",
        num_images_per_prompt=2,
        num_inference_steps=3,
        guidance_scale=3.0,
        height=32,
        width=32,
        generator=[torch.Generator().manual_seed(5 + i) for i in range(2)],
        output_type="pil",
    ).images
    assert np.array_equal(pixels(ours.images), pixels(ref))


def test_same_seed_same_images_other_seed_other_images(model):
    a = model.generate("a red circle", Options(seed=1, **OPTS))
    b = model.generate("a red circle", Options(seed=1, **OPTS))
    c = model.generate("a red circle", Options(seed=2, **OPTS))
    assert np.array_equal(pixels(a.images), pixels(b.images))
    assert not np.array_equal(pixels(a.images), pixels(c.images))
    assert a.seed == 1 and a.settings["seeds"] == [1]


def test_batch_equals_items_one_by_one(model):
    prompts, seeds = ["a red circle", "two blue squares", "a green star"], [3, 4, 5]
    batch = model.generate_batch(prompts, seeds, Options(**OPTS)).images
    single = [
        model.generate_batch([p], [s], Options(**OPTS)).images[0]
        for p, s in zip(prompts, seeds, strict=True)
    ]
    assert np.abs(pixels(batch) - pixels(single)).max() <= 1


def test_num_images_reproduce_alone(model):
    """Image i of a call with num_images=n is the image of seed + i alone."""
    many = model.generate("a red circle", Options(seed=10, num_images=3, **OPTS))
    third = model.generate("a red circle", Options(seed=12, **OPTS))
    assert np.abs(pixels(many.images[2:]) - pixels(third.images)).max() <= 1


def test_output_fields_and_callback(model):
    seen = []
    out = model.generate(
        "a red circle",
        Options(
            seed=0, width=48, height=16, callback=lambda i, n, info: seen.append((i, n)), **OPTS
        ),
    )
    assert out.images[0].size == (48, 16) and out.images[0].mode == "RGB"
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert {"text", "denoise", "decode"} <= out.timings.keys()
    assert out.settings["steps"] == 3 and out.settings["scheduler"] == "dpm++"


@pytest.mark.parametrize(
    "options, message",
    [
        (Options(width=33), "multiple of 2"),
        (Options(height=8192), "out of range"),
        (Options(steps=0), "steps must be at least 1"),
        (Options(guidance_scale=-1), "guidance scale must be >= 0"),
        (Options(num_images=0), "at least 1"),
        (Options(scheduler="plms"), "unknown scheduler 'plms'"),
    ],
)
def test_bad_options_name_the_problem(model, options, message):
    options.progress = False
    with pytest.raises(UserInputError, match=message):
        model.generate("a red circle", options)


def test_empty_prompt_is_refused(model):
    with pytest.raises(UserInputError, match="prompt is empty"):
        model.generate("   ")


def test_unknown_words(model):
    assert model.unknown_words("a red giraffe circle, a Zebra") == ["giraffe", "zebra"]


def test_save_load_round_trip_and_diffusers_loads_it(model, saved):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    assert (saved / "model_index.json").is_file()
    assert list(saved.glob("unet/*.safetensors")) and not list(saved.rglob("*.bin"))
    loaded = LatentDiffusion.from_pretrained(saved)
    a = model.generate("a red circle", Options(seed=7, **OPTS))
    b = loaded.generate("a red circle", Options(seed=7, **OPTS))
    assert np.array_equal(pixels(a.images), pixels(b.images))
    assert loaded.known_words == {"a", "red", "circle"}
    pipe = DiffusionPipeline.from_pretrained(saved)
    assert isinstance(pipe, StableDiffusionPipeline)


def test_resave_records_no_path_it_was_loaded_from(saved, tmp_path):
    """diffusers writes a loaded component's source folder back as ``_name_or_path``."""
    again = LatentDiffusion.from_pretrained(saved).save_pretrained(tmp_path / "again")
    configs = {f.parent.name: json.loads(f.read_text()) for f in again.glob("*/config.json")}
    assert {"unet", "vae", "text_encoder"} <= configs.keys()
    assert [name for name, c in configs.items() if "_name_or_path" in c] == []
    assert str(saved) not in "".join(f.read_text() for f in again.rglob("*.json"))


def test_fp16_save_keeps_model_and_loads_as_fp32(model, tmp_path):
    path = model.save_pretrained(tmp_path / "half", dtype=torch.float16)
    assert next(model.components.denoiser.parameters()).dtype == torch.float32
    loaded = LatentDiffusion.from_pretrained(path)
    assert next(loaded.components.denoiser.parameters()).dtype == torch.float32
    a = model.generate("a red circle", Options(seed=7, **OPTS))
    b = loaded.generate("a red circle", Options(seed=7, **OPTS))
    assert np.abs(pixels(a.images) - pixels(b.images)).max() <= 8


def test_dit_denoiser_generates_and_saves(tmp_path):
    from diffusers import DiffusionPipeline, PixArtAlphaPipeline

    dit = tiny("dit")
    out = dit.generate("a red circle", Options(seed=0, num_images=2, **OPTS))
    assert [i.size for i in out.images] == [(32, 32)] * 2
    path = dit.save_pretrained(tmp_path / "dit")
    assert isinstance(DiffusionPipeline.from_pretrained(path), PixArtAlphaPipeline)
    again = LatentDiffusion.from_pretrained(path).generate(
        "a red circle", Options(seed=0, num_images=2, **OPTS)
    )
    assert np.array_equal(pixels(out.images), pixels(again.images))
    patch, f = dit.components.denoiser.config.patch_size, dit.vae_factor
    if patch > 1:  # a side the VAE divides but the patches do not: named, not a shape error
        side = f * patch * 2 + f
        with pytest.raises(UserInputError, match=f"not a multiple of {f * patch}, .*patch size"):
            dit.generate("a red circle", Options(seed=0, width=side, height=side, **OPTS))


def test_load_generator_resolves_a_directory(saved):
    gen = load_generator(str(saved), device="cpu")
    assert isinstance(gen, LatentDiffusion) and gen.name == str(saved)


def test_cli_generate_writes_png_with_metadata(saved, tmp_path, capsys):
    out = tmp_path / "x.png"
    args = ["generate", "a red circle", "--model", str(saved), "--seed", "4", "--steps", "2"]
    assert cli([*args, "-o", str(out)]) == 0
    meta = read_png_metadata(out)
    assert meta["prompt"] == "a red circle" and meta["seed"] == 4 and meta["steps"] == 2
    with Image.open(out) as image:
        assert image.text["seed"] == "4" and image.text["model"] == str(saved)
        first = np.asarray(image.convert("RGB"))
    # never overwritten without --overwrite; with it, the same seed gives the same file
    assert cli([*args, "-o", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert cli([*args, "-o", str(out), "--overwrite"]) == 0
    with Image.open(out) as image:
        assert np.array_equal(first, np.asarray(image.convert("RGB")))
    assert not list(tmp_path.glob(".tmp-*"))


def test_cli_generate_prompts_file_and_json(saved, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\ntwo blue squares\n")
    out_dir = tmp_path / "out"
    code = cli(
        [
            "generate",
            "--prompts",
            str(prompts),
            "--output-dir",
            str(out_dir),
            "--model",
            str(saved),
            "--seed",
            "0",
            "--steps",
            "1",
            "--json",
            "--batch-size",
            "2",
        ]
    )
    assert code == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in lines] == ["a red circle", "two blue squares"]
    index = [json.loads(x) for x in (out_dir / "index.jsonl").read_text().splitlines()]
    assert index == [
        {"prompt": "a red circle", "seed": 0, "file": "0001.png"},
        {"prompt": "two blue squares", "seed": 2, "file": "0003.png"},
    ]
    assert sorted(p.name for p in out_dir.iterdir()) == ["0001.png", "0003.png", "index.jsonl"]
    # shapes-eval reads the folder back (a random model: it runs, it does not score)
    assert cli(["eval", "--images", str(out_dir)]) == 0
    assert "overall" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--width", "31"], "width 31 is not a multiple of 2"),
        (["--steps", "0"], "steps must be at least 1"),
        (["--guidance", "-2"], "guidance scale must be >= 0"),
        (["-o", "/nonexistent-dir/x.png"], "folder /nonexistent-dir does not exist"),
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--dtype", "fp16", "--device", "cpu"], "fp16 is not supported on CPU"),
        (["--device", "meta"], "anygen runs on cpu, cuda or mps"),
        (["--negative", "blue", "--guidance", "1"], "a negative prompt needs guidance above 1"),
    ],
)
def test_cli_generate_bad_input_is_one_line(saved, tmp_path, capsys, extra, message):
    args = [
        "generate",
        "a red circle",
        "--model",
        str(saved),
        "-o",
        str(tmp_path / "y.png"),
        *extra,
    ]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


def test_a_device_this_machine_lacks_is_named(monkeypatch):
    from anygen.errors import UserInputError
    from anygen.pipelines import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(UserInputError, match=r"has 1 CUDA device \(cuda:0\)"):
        pick_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserInputError, match=r"has 2 CUDA devices \(cuda:0 to cuda:1\)"):
        pick_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UserInputError, match="MPS is not available here"):
        pick_device("mps")


def test_cli_generate_empty_prompt_and_unreadable_prompts(tmp_path, capsys):
    assert cli(["generate", " "]) == 2
    assert "the prompt is empty" in capsys.readouterr().err
    assert (
        cli(["generate", "--prompts", str(tmp_path / "missing.txt"), "--output-dir", str(tmp_path)])
        == 2
    )
    assert "cannot read prompts file" in capsys.readouterr().err


def test_cli_warns_on_unknown_words(saved, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        cli(
            [
                "generate",
                "a red giraffe",
                "--model",
                str(saved),
                "--steps",
                "1",
                "-o",
                str(tmp_path / "g.png"),
            ]
        )
    assert "never seen: giraffe" in caplog.text and "It knows: a circle red" in caplog.text


def _copy(saved, tmp_path):
    import shutil

    return shutil.copytree(saved, tmp_path / "copy")


@pytest.mark.parametrize("part", ["unet", "text_encoder", "vae"])
def test_truncated_weights_are_a_clear_error(saved, tmp_path, capsys, part):
    broken = _copy(saved, tmp_path)
    weights = next((broken / part).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    assert (
        cli(["generate", "a red circle", "--model", str(broken), "-o", str(tmp_path / "z.png")])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot load {part}" in err[0] and not (tmp_path / "z.png").exists()


@pytest.mark.parametrize("part", ["unet", "text_encoder"])
def test_pickle_weights_in_a_pipeline_folder_are_refused(saved, tmp_path, part):
    """A component whose weights are only a pickle is not loaded (torch.load can run code)."""
    from safetensors.torch import load_file

    from anygen.errors import CheckpointError

    broken = _copy(saved, tmp_path)
    weights = next((broken / part).glob("*.safetensors"))
    name = "diffusion_pytorch_model.bin" if part == "unet" else "pytorch_model.bin"
    torch.save(load_file(weights), broken / part / name)
    weights.unlink()
    with pytest.raises(
        CheckpointError, match=f"cannot load {part} .*{name}: convert to safetensors"
    ):
        LatentDiffusion.from_pretrained(broken)


def test_foreign_component_library_is_refused(saved, tmp_path):
    from anygen.errors import CheckpointError

    broken = _copy(saved, tmp_path)
    index = json.loads((broken / "model_index.json").read_text())
    index["unet"] = ["my_remote_code", "EvilUNet"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="loads only diffusers and transformers"):
        LatentDiffusion.from_pretrained(broken)


def test_missing_component_folder_is_a_clear_error(saved, tmp_path):
    import shutil

    from anygen.errors import CheckpointError

    broken = _copy(saved, tmp_path)
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError, match="has no vae/ folder"):
        LatentDiffusion.from_pretrained(broken)


def _tiny_clip_tokenizer(folder):
    """A real CLIPTokenizer (BPE files on disk), as SD checkpoints ship, with a tiny vocab."""
    from transformers import CLIPTokenizer

    folder.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in "abcdefghijklmnopqrstuvwxyz":
            vocab[c + suffix] = len(vocab)
    vocab.update({"re": len(vocab), "red</w>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"}
    config = {"model_max_length": 16, "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **special}))
    return CLIPTokenizer.from_pretrained(folder)


def test_loads_a_stable_diffusion_checkpoint_saved_by_diffusers(tmp_path):
    """SD-1.x layout as diffusers writes it: CLIPTokenizer, PNDM scheduler, safety checker
    slot; anygen runs it with the scheduler it ships with, and matches diffusers."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = _tiny_clip_tokenizer(tmp_path / "tok")
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = PNDMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        skip_prk_steps=True,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "sd")
    pipe.set_progress_bar_config(disable=True)

    gen = load_generator(str(tmp_path / "sd"), device="cpu")
    assert gen.defaults["scheduler"] == "pndm" and gen.default_size == 16
    ours = gen.generate("a red circle", Options(seed=3, **OPTS)).images
    ref = pipe(
        "a red circle",
        num_inference_steps=3,
        guidance_scale=3.0,
        generator=[torch.Generator().manual_seed(3)],
    ).images
    assert np.array_equal(pixels(ours), pixels(ref))


def test_reconstruction_suite_scores_an_ldm_models_vae(model, saved, capsys):
    """`anygen eval --suite reconstruction` on an ldm directory: decode(encode(x)) through its
    VAE (the latent mode), scored on the same held-out scenes as a direct round trip;
    progress=False draws no progress bar."""
    from anygen.data import shapes
    from anygen.data.datasets import images_to_tensor, tensor_to_images
    from anygen.data.render import render_image
    from anygen.eval.run import evaluate_model

    report = evaluate_model(str(saved), "reconstruction", n=4, batch_size=2, progress=False)
    assert report.meta["suite"] == "reconstruction" and len(report.records) == 4
    assert "shapes-eval" not in capsys.readouterr().err
    assert report.metrics["subject_kept_n"] == 1
    vae = model.components.vae
    originals = [render_image(shapes.task_sample("t2i", 0, i, "test").scene, 32) for i in range(4)]
    with torch.no_grad():
        x = images_to_tensor(originals)
        rebuilt = tensor_to_images(vae.decode(vae.encode(x).latent_dist.mode()).sample)
    mse = ((pixels(originals) - pixels(rebuilt)).astype(np.float64) ** 2).mean(axis=(1, 2, 3))
    psnr = float(np.mean(10 * np.log10(255.0**2 / mse)))
    assert report.metrics["psnr_db"] == pytest.approx(psnr, abs=0.05)


# ------------------------------------------------------------------ the bundled default


@pytest.fixture(scope="module")
def bundled():
    return load_generator(None, device="cpu")  # the default model: shapes-ldm


def test_bundled_default_is_shapes_ldm_and_deterministic(bundled):
    assert bundled.name == "shapes-ldm" and bundled.default_size == 64
    assert next(bundled.components.denoiser.parameters()).dtype == torch.float32
    a = bundled.generate("a red circle", Options(seed=0, steps=2, progress=False))
    b = bundled.generate("a red circle", Options(seed=0, steps=2, progress=False))
    assert a.images[0].size == (64, 64) and np.array_equal(pixels(a.images), pixels(b.images))
    assert bundled.unknown_words("a red circle above two blue squares") == []
    assert bundled.unknown_words("a red giraffe") == ["giraffe"]


def test_bundled_card_records_recipe_and_score():
    from anygen.hub import card_metadata

    meta = card_metadata("shapes-ldm")
    assert meta["recipe"] == "recipes/ldm_shapes.py" and "seed" in meta
    # the card's score is the one its eval.json holds, not a stale copy
    scored = json.loads((resolve("shapes-ldm") / "eval.json").read_text())
    assert scored["n"] == 300 and meta["shapes_eval_t2i_overall"] == round(scored["overall"], 3)


@pytest.mark.skipif("shapes-dit" not in bundled_models("model"), reason="not bundled")
def test_bundled_shapes_dit_is_a_seeded_dit_over_shapes_ldms_vae_and_text_encoder(bundled):
    """shapes-dit: a PixArt DiT trained over shapes-ldm's VAE and frozen text encoder, then
    continued; its default guidance is the one its card says was chosen last on validation
    prompts.
    shapes-ldm's VAE was fine-tuned since (recipes/ldm_vae_subjects.py) with the latents of
    plain scenes anchored, so the two VAEs still encode a scene alike."""
    from diffusers import PixArtTransformer2DModel

    from anygen.data.datasets import ShapesT2IDataset
    from anygen.hub import card_metadata

    dit = load_generator("shapes-dit", device="cpu")
    assert isinstance(dit.components.denoiser, PixArtTransformer2DModel)
    scenes = torch.stack([ShapesT2IDataset(8, seed=5, split="test")[i]["image"] for i in range(8)])
    with torch.no_grad():
        ours = dit.components.vae.encode(scenes).latent_dist.mean
        base = bundled.components.vae.encode(scenes).latent_dist.mean
    assert (ours - base).pow(2).mean() < 1e-3 < ours.pow(2).mean()
    a = dit.generate("a red circle", Options(seed=3, steps=4, progress=False))
    b = dit.generate("a red circle", Options(seed=3, steps=4, progress=False))
    assert a.images[0].size == (64, 64) and np.array_equal(pixels(a.images), pixels(b.images))
    meta = card_metadata("shapes-dit")
    # continued from the shapes-dit trained over shapes-ldm's VAE and text encoder
    first = meta["started_from"]["argv"]
    assert meta["init_from"] == "shapes-dit" and meta["preset"] == "shapes-dit"
    assert first[first.index("--vae-from") + 1] == "shapes-ldm"
    assert first[first.index("--text-encoder-from") + 1] == "shapes-ldm"
    # the defaults are the last choice made on validation prompts
    chosen = (meta.get("sampling_reselection") or {}).get("chosen")
    chosen = chosen or meta["sampling_selection"]["chosen"]
    assert dit.defaults["guidance_scale"] == chosen["guidance_scale"]
    # its text encoder is shapes-ldm's, kept frozen while the DiT learnt to read it
    assert meta["freeze_text_encoder"] is True and "--freeze-text-encoder" in first
    ours, base = dit.components.text_encoder.state_dict(), bundled.components.text_encoder
    assert all(torch.equal(v, ours[k]) for k, v in base.state_dict().items())


@pytest.mark.slow
def test_bundled_shapes_ldm_meets_its_quality_bar(bundled):
    """Issue 3's bar, on 300 held-out prompts: overall >= 0.85, single object >= 0.95,
    held-out pairs >= 0.70."""
    from anygen.eval.suites import run_t2i

    report = run_t2i(
        lambda p, s: bundled.generate_batch(p, s, Options(progress=False)).images,
        n=300,
        seed=0,
        batch_size=32,
        progress=False,
    )
    scores = {k: s for k, (_, s) in report.categories.items()}
    assert report.overall >= 0.85, report.table()
    assert scores["single_object"] >= 0.95, report.table()
    assert scores["held_out"] >= 0.70, report.table()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--timestep-shift", "0", "--timestep-shift must be positive, got 0.0"),
        ("--snr-floor", "-1", "--snr-floor must be positive, got -1.0"),
        ("--terminal-fraction", "2", "--terminal-fraction must be in [0, 1], got 2.0"),
        ("--caption-forms", "place=2", "unknown caption form(s) ['place']"),
        ("--caption-forms", "position", "expected FORM=WEIGHT, got 'position'"),
        ("--caption-forms", "position=-1", "must be finite and >= 0"),
        ("--keep-checkpoints", "-1", "--keep-checkpoints must be >= 0, got -1"),
        ("--ema-decay", "0", "ema_decay"),  # the denoiser's stage: refused before the VAE's
        ("--decoder-lr", "0", "learning_rate > 0"),
        ("--decoder-steps", "-1", "--decoder-steps must be >= 0, got -1"),
    ],
)
def test_recipe_refuses_bad_loss_settings_before_training_anything(tmp_path, flag, value, message):
    import subprocess
    import sys
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "ldm_shapes.py"
    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "anygen", "train", str(recipe), "--output-dir", str(out),
         "--preset", "tiny", flag, value],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]
    assert not (out / "vae").exists()  # refused before the VAE stage trained


def test_recipe_trains_every_stage_and_saves_a_loadable_model(tmp_path):
    """`anygen train recipes/ldm_shapes.py` end to end on the tiny preset, 2 steps a stage."""
    import subprocess
    import sys
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "ldm_shapes.py"
    out = tmp_path / "run"
    args = ["--output-dir", str(out), "--preset", "tiny", "--vae-steps", "2", "--steps", "2",
            "--decoder-steps", "2", "--batch-size", "4", "--vae-batch-size", "4",
            "--checkpoint-every", "1", "--keep-checkpoints", "1", "--select-n", "4",
            "--eval-n", "7"]  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "anygen", "train", str(recipe), *args],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    for stage in ("vae", "denoiser", "decoder"):
        kept = sorted(p.name for p in (out / stage / "checkpoints").iterdir())
        assert kept == ["step-00000002"], (stage, kept)  # --keep-checkpoints 1 pruned step 1
    model = out / "model"
    card = (model / "README.md").read_text()
    assert "recipes/ldm_shapes.py" in card and "overall" in card
    assert json.loads((model / "eval.json").read_text())["n"] == 7
    # the default guidance is the best of the grid on validation prompts, and the card says so
    selection = json.loads((model / "training.json").read_text())["sampling_selection"]
    assert [r["guidance_scale"] for r in selection["grid"]] == [1.5, 2.0, 2.5, 3.0, 5.0, 8.0]
    best = max(selection["grid"], key=lambda r: r["validation_overall"])
    assert selection["n"] == 4 and selection["chosen"] == {"guidance_scale": best["guidance_scale"]}
    saved = json.loads((model / "anygen.json").read_text())
    assert saved["guidance_scale"] == best["guidance_scale"]
    assert "validation overall" in card
    scale = json.loads((out / "vae" / "scaling_factor.json").read_text())["scaling_factor"]
    loaded = LatentDiffusion.from_pretrained(model)
    assert loaded.components.vae.config.scaling_factor == pytest.approx(scale)
    assert loaded.generate("a red circle", Options(seed=0, **OPTS)).images[0].size == (32, 32)

    # continuing from the saved model: no VAE stage, the same VAE and latent scale
    more = tmp_path / "more"
    args = ["--output-dir", str(more), "--preset", "tiny", "--init-from", str(model), "--steps",
            "2", "--decoder-steps", "2", "--decoder-foreground-weight", "10", "--batch-size", "4",
            "--vae-batch-size", "4", "--select-n", "0", "--eval-n", "0",
            "--prediction-type", "v_prediction", "--zero-terminal-snr", "--snr-floor", "1",
            "--timestep-shift", "3", "--terminal-fraction", "0.5",
            "--caption-forms", "position=3,count=0"]  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "anygen", "train", str(recipe), *args],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert (
        not (more / "vae").exists()
        and "Continued from" in (more / "model" / "README.md").read_text()
    )
    again = LatentDiffusion.from_pretrained(more / "model")
    assert again.components.vae.config.scaling_factor == pytest.approx(scale)
    enc = loaded.components.vae.encoder.conv_in.weight
    assert torch.equal(again.components.vae.encoder.conv_in.weight, enc)  # the encoder is kept
    # ... switched to v-prediction over a zero-terminal-SNR schedule, as asked and recorded
    schedule = again.components.scheduler.config
    assert (schedule.prediction_type, schedule.rescale_betas_zero_snr) == ("v_prediction", True)
    facts = json.loads((more / "model" / "training.json").read_text())
    recorded = ("prediction_type", "zero_terminal_snr", "snr_floor", "timestep_shift")
    assert [facts[k] for k in recorded] == ["v_prediction", True, 1.0, 3.0]
    assert facts["terminal_fraction"] == 0.5
    assert facts["caption_forms"] == {"position": 3.0, "count": 0.0}

    # a new denoiser over the saved VAE and its frozen text encoder: no VAE stage, no decoder
    # stage with 0 steps, every VAE and text-encoder weight and the latent scale as saved
    fresh = tmp_path / "fresh"
    args = ["--output-dir", str(fresh), "--preset", "tiny", "--vae-from", str(model), "--steps",
            "2", "--decoder-steps", "0", "--batch-size", "4", "--checkpoint-every", "2",
            "--select-n", "0", "--eval-n", "0", "--text-encoder-from", str(model),
            "--freeze-text-encoder"]  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "anygen", "train", str(recipe), *args],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert not (fresh / "vae").exists() and not (fresh / "decoder").exists()
    assert "The VAE is" in (fresh / "model" / "README.md").read_text()
    new = LatentDiffusion.from_pretrained(fresh / "model")
    assert new.components.scheduler.config.prediction_type == "epsilon"  # the preset's
    assert new.components.vae.config.scaling_factor == pytest.approx(scale)
    old_vae = loaded.components.vae.state_dict()
    assert all(torch.equal(v, old_vae[k]) for k, v in new.components.vae.state_dict().items())
    old_text = loaded.components.text_encoder.state_dict()
    new_text = new.components.text_encoder.state_dict()
    assert all(torch.equal(v, old_text[k]) for k, v in new_text.items())
    assert "the text encoder started from" in (fresh / "model" / "README.md").read_text()
    facts = json.loads((fresh / "model" / "training.json").read_text())
    assert facts["text_encoder_from"] == str(model) and facts["freeze_text_encoder"] is True
    old_denoiser = loaded.components.denoiser.state_dict()
    assert not all(  # the denoiser is new, not the saved one
        torch.equal(v, old_denoiser[k]) for k, v in new.components.denoiser.state_dict().items()
    )
    assert (fresh / "denoiser" / "checkpoints" / "step-00000002").is_dir()

    # a VAE that does not fit the preset: one clear line, no traceback
    args = ["--output-dir", str(tmp_path / "bad"), "--preset", "shapes", "--vae-from", str(model)]
    run = subprocess.run(
        [sys.executable, "-m", "anygen", "train", str(recipe), *args],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode != 0 and "does not fit preset 'shapes'" in run.stderr
    assert "Traceback" not in run.stderr
    # nor a text encoder: refused before the VAE stage trains; a frozen random one is refused
    for extra, says in (
        (["--text-encoder-from", str(model)], "the text encoder of"),
        (["--freeze-text-encoder"], "would keep a random text encoder"),
    ):
        args = ["--output-dir", str(tmp_path / "bad-text"), "--preset", "shapes", *extra]
        run = subprocess.run(
            [sys.executable, "-m", "anygen", "train", str(recipe), *args],
            capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert run.returncode != 0 and says in run.stderr, run.stderr[-500:]
        assert "Traceback" not in run.stderr and not (tmp_path / "bad-text" / "vae").exists()


def test_cli_eval_samples_with_the_given_settings(saved, tmp_path, capsys):
    report = tmp_path / "report.json"
    args = ["eval", "--model", str(saved), "--suite", "t2i", "--n", "2", "--batch-size", "2"]
    assert (
        cli([*args, "--steps", "2", "--scheduler", "euler", "--seed", "7", "-o", str(report)]) == 0
    )
    data = json.loads(report.read_text())
    meta = data["meta"]
    assert (meta["steps"], meta["scheduler"], meta["guidance_scale"]) == (2, "euler", None)
    # the report records the prompt set's seed, which the sampling options must not hide
    assert meta["seed"] == 7 and sorted(r["seed"] for r in data["records"]) == [7, 8]
    capsys.readouterr()
    # the settings reach the model: its own error for a sampler it does not have
    assert cli([*args, "--scheduler", "nope"]) == 2
    assert "unknown scheduler 'nope'" in capsys.readouterr().err
    assert cli([*args, "--steps", "0"]) == 2
    assert "steps must be at least 1" in capsys.readouterr().err
    # nothing is sampled when scoring a folder or a reconstruction
    assert cli(["eval", "--images", str(tmp_path), "--guidance", "2"]) == 2
    assert "--guidance cannot apply to --images" in capsys.readouterr().err
    assert cli(["eval", "--model", str(saved), "--suite", "reconstruction", "--steps", "5"]) == 2
    assert "--steps cannot apply to the reconstruction suite" in capsys.readouterr().err


def test_cli_eval_edit_suite_takes_the_img2img_strength(saved, tmp_path, capsys, cli_edit_eval):
    """A text-to-image model edits by img2img: --strength reaches it, only in the edit suite."""
    cli_edit_eval(saved, "--strength", 0.5)
    capsys.readouterr()
    args = ["eval", "--model", str(saved), "--suite", "edit", "--n", "2", "--steps", "2"]
    assert cli([*args, "--strength", "0"]) == 2
    assert "strength must be in (0, 1], got 0.0" in capsys.readouterr().err
    # image guidance belongs to InstructPix2Pix models: the model says so in one line
    assert cli([*args, "--image-guidance", "2"]) == 2
    assert "takes no image guidance setting" in capsys.readouterr().err
    assert cli(["eval", "--images", str(tmp_path), "--strength", "0.5"]) == 2
    assert "--strength applies to the edit suite, not to --images" in capsys.readouterr().err


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_denoiser_loss_weights_each_timestep_by_its_clamped_snr(model, prediction):
    from anygen.models.ldm import denoiser_loss, tokenize

    c = model.components
    scheduler = type(c.scheduler).from_config(c.scheduler.config, prediction_type=prediction)
    latents = torch.randn(
        1, c.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(1)
    )
    ids = tokenize(c.tokenizer, ["a red circle"])
    alphas = scheduler.alphas_cumprod

    def loss(seed: int, **weights) -> float:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            out = denoiser_loss(c.denoiser, c.text_encoder, scheduler, latents, ids, gen, **weights)
        return float(out["loss"])

    seen_low = False
    for seed in range(6):
        # the timestep the loss draws: after the noise, from the same generator
        gen = torch.Generator().manual_seed(seed)
        torch.randn(latents.shape, generator=gen)
        t = int(torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=gen))
        snr = float(alphas[t] / (1 - alphas[t]))
        per_sample = loss(seed, snr_gamma=None)  # one sample: the plain MSE
        to_target = snr if prediction == "epsilon" else snr + 1  # the parametrisation's share
        assert loss(seed, snr_gamma=5.0) == pytest.approx(
            per_sample * min(snr, 5.0) / to_target, rel=1e-5
        )
        floored = loss(seed, snr_gamma=5.0, snr_floor=1.0)
        assert floored == pytest.approx(per_sample * min(max(snr, 1.0), 5.0) / to_target, rel=1e-5)
        assert loss(seed, snr_gamma=None, snr_floor=1.0) == pytest.approx(
            per_sample * max(snr, 1.0) / to_target, rel=1e-5
        )
        seen_low |= snr < 1.0
        if snr < 1.0 and prediction == "epsilon":  # the floor raises high-noise timesteps
            assert floored > per_sample * 1.01
    assert seen_low  # the seeds reach the high-noise timesteps the floor is for


def test_denoiser_loss_region_weight_is_a_weighted_mean_over_positions(model):
    """Weights on the left and the right halves split the plain loss into its two halves'
    means; a constant weight changes nothing."""
    from anygen.models.ldm import denoiser_loss, tokenize

    c = model.components
    latents = torch.randn(
        2, c.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(1)
    )
    ids = tokenize(c.tokenizer, ["a red circle", "a blue square"])

    def loss(weight: torch.Tensor | None) -> float:
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            args = (c.denoiser, c.text_encoder, c.scheduler, latents, ids, gen)
            return float(denoiser_loss(*args, region_weight=weight)["loss"])

    left = torch.zeros(2, 1, 8, 8)
    left[..., :4] = 1.0
    plain, a, b = loss(None), loss(left), loss(1.0 - left)
    assert a != pytest.approx(b, rel=1e-3)
    assert plain == pytest.approx((a + b) / 2, rel=1e-5)
    assert loss(torch.full((2, 1, 8, 8), 3.0)) == pytest.approx(plain, rel=1e-5)


def test_sample_timesteps_shift_moves_draws_to_high_noise():
    from anygen.models.ldm import sample_timesteps

    uniform = sample_timesteps(1000, 1000, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(
        uniform, torch.randint(0, 1000, (1000,), generator=torch.Generator().manual_seed(3))
    )
    for shift in (3.0, 0.5):
        t = sample_timesteps(40000, 1000, shift, torch.Generator().manual_seed(0))
        assert t.dtype == torch.long
        # s u / (1 + (s - 1) u) >= 1/2  <=>  u >= 1 / (1 + s)
        assert float((t >= 500).float().mean()) == pytest.approx(shift / (1 + shift), abs=0.01)
    with pytest.raises(UserInputError, match="timestep shift must be positive, got 0"):
        sample_timesteps(4, 1000, 0.0)


def test_sample_timesteps_terminal_fraction_trains_that_share_at_the_last_timestep():
    from anygen.models.ldm import sample_timesteps

    plain = sample_timesteps(32, 1000, 1.0, torch.Generator().manual_seed(4))
    t = sample_timesteps(32, 1000, 1.0, torch.Generator().manual_seed(4), terminal_fraction=0.25)
    assert torch.equal(t[:8], torch.full((8,), 999)) and torch.equal(t[8:], plain[8:])
    assert torch.equal(sample_timesteps(5, 10, terminal_fraction=1.0), torch.full((5,), 9))
    with pytest.raises(UserInputError, match=r"terminal fraction must be in \[0, 1\], got 1.5"):
        sample_timesteps(4, 1000, terminal_fraction=1.5)


def test_denoiser_loss_draws_its_timesteps_with_the_shift(model):
    from anygen.models.ldm import denoise, denoiser_loss, sample_timesteps, tokenize

    c = model.components
    latents = torch.randn(
        2, c.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(1)
    )
    ids = tokenize(c.tokenizer, ["a red circle", "a blue square"])
    T = c.scheduler.config.num_train_timesteps
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=gen)
    t = sample_timesteps(2, T, 4.0, gen, terminal_fraction=0.5)  # after the noise, as the loss
    assert int(t[0]) == T - 1
    with torch.no_grad():
        states = c.text_encoder(ids)[0]
        expected = F.mse_loss(
            denoise(c.denoiser, c.scheduler.add_noise(latents, noise, t), t, states), noise
        )
        got = denoiser_loss(
            c.denoiser, c.text_encoder, c.scheduler, latents, ids,
            torch.Generator().manual_seed(5), snr_gamma=None, timestep_shift=4.0, terminal_fraction=0.5,
        )["loss"]  # fmt: skip
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    # latents that arrive in bf16 (a VAE under bf16 autocast) are noised in fp32: the same
    # loss as their fp32 values, not a schedule rounded to bf16 (1 - alpha_bar(0) -> 0)
    low = latents.to(torch.bfloat16)
    with torch.no_grad():
        a, b = (
            denoiser_loss(
                c.denoiser, c.text_encoder, c.scheduler, x, ids, torch.Generator().manual_seed(6),
                snr_gamma=None,
            )["loss"]
            for x in (low, low.float())
        )  # fmt: skip
    assert float(a) == float(b)


def test_the_recipe_refuses_terminal_rows_that_min_snr_would_weight_zero(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "ldm_shapes.py"
    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "anygen", "train", str(recipe), "--output-dir", str(out),
         "--preset", "tiny", "--prediction-type", "v_prediction", "--zero-terminal-snr",
         "--terminal-fraction", "0.5"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode != 0 and "pass --snr-floor" in run.stderr, run.stderr[-2000:]
    assert not (out / "vae").exists()


def test_v_prediction_with_zero_terminal_snr_matches_diffusers_and_round_trips(tmp_path):
    from anygen.models.ldm import build_scheduler

    torch.manual_seed(0)
    cfg = dataclasses.replace(
        LDM_PRESETS["tiny"], prediction_type="v_prediction", zero_terminal_snr=True
    )
    model = LatentDiffusion(
        build_components(cfg, load_text_tokenizer("shapes-bpe")), name="tiny-v", defaults={}
    )
    assert float(model.components.scheduler.alphas_cumprod[-1]) == 0.0  # the last step: noise
    ours = {}
    for name in ("dpm++", "ddim", "euler"):
        ours[name] = model.generate("a red circle", Options(seed=3, scheduler=name, **OPTS)).images
        pipe = model.to_diffusers()
        pipe.scheduler = model.sampler(name)
        assert pipe.scheduler.config.prediction_type == "v_prediction"
        assert pipe.scheduler.config.rescale_betas_zero_snr
        pipe.set_progress_bar_config(disable=True)
        ref = pipe(
            "a red circle",
            num_inference_steps=3,
            guidance_scale=3.0,
            height=32,
            width=32,
            generator=[torch.Generator().manual_seed(3)],
        ).images
        assert np.array_equal(pixels(ours[name]), pixels(ref)), name
        assert pixels(ours[name]).std() > 0  # an image, not a flat (NaN-decoded) one
    loaded = LatentDiffusion.from_pretrained(model.save_pretrained(tmp_path / "v"))
    config = loaded.components.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr) == ("v_prediction", True)
    again = loaded.generate("a red circle", Options(seed=3, scheduler="euler", **OPTS)).images
    assert np.array_equal(pixels(again), pixels(ours["euler"]))
    # samplers without the rescaled schedule are refused, by name
    with pytest.raises(UserInputError, match="'heun' cannot sample a model trained with zero"):
        loaded.generate("a red circle", Options(seed=3, scheduler="heun", **OPTS))
    with pytest.raises(UserInputError, match="'pndm' cannot sample a model trained with zero"):
        loaded.edit(Image.new("RGB", (32, 32)), "a blue circle", Options(scheduler="pndm", **OPTS))
    with pytest.raises(UserInputError, match="zero terminal SNR needs v_prediction"):
        build_scheduler(dataclasses.replace(cfg, prediction_type="epsilon"))
    with pytest.raises(UserInputError, match="unknown prediction type 'sample'"):
        build_scheduler(dataclasses.replace(cfg, prediction_type="sample"))
