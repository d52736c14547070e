"""Subject and edit recipes on the ldm path, end to end on a tiny random base model.

DreamBooth-LoRA and textual inversion teach a subject from rendered reference images,
the instruct-edit recipe makes an InstructPix2Pix editor; each runs a few steps through
``anygen train`` and its result loads back the way a user loads it (``--lora``,
``--embedding``, ``anygen edit``/``anygen eval``). The DreamBench similarity helpers run
on tiny random CLIP and DINO models built from configs. Nothing is downloaded.
"""

from __future__ import annotations

import json
import string
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from anygen.cli import main as cli
from anygen.data import shapes
from anygen.data.render import render_image
from anygen.errors import CheckpointError, UserInputError
from anygen.hub import bundled_models
from anygen.models.ldm import LDM_PRESETS, build_components, widen_denoiser_inputs
from anygen.pipelines import Options, load_generator
from anygen.pipelines.base import make_generator
from anygen.pipelines.text_to_image import LatentDiffusion
from anygen.tokenizers.text import load_text_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SHAPES_LDM = ROOT / "anygen" / "assets" / "models" / "shapes-ldm" / "anygen.json"
OPTS = dict(steps=2, progress=False)
PROMPT = "the sks star to the left of a blue square"


def reset_accelerate() -> None:
    # accelerate keeps one state per process; each recipe run starts a fresh one
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_recipe_defaults(name: str):
    """A recipe's parsed defaults (its required flags filled in)."""
    from anygen.training import load_recipe

    required = ["--subject-dir", "x", "--class-word", "star", "--output-dir", "y"]
    return load_recipe(RECIPES / name).parse_args(required)


def safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(i) for i in images]).astype(np.int16)


def run_recipe(name: str, *args: str) -> None:
    reset_accelerate()
    assert cli(["train", str(RECIPES / name), *args]) == 0
    reset_accelerate()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("subjects")


@pytest.fixture(scope="module")
def base(root) -> Path:
    """A tiny random ldm (32 px) that knows shapes-ldm's words, saved as a directory."""
    torch.manual_seed(0)
    components = build_components(LDM_PRESETS["tiny"], load_text_tokenizer("shapes-bpe"))
    words = json.loads(SHAPES_LDM.read_text())["known_words"]
    defaults = {"steps": 2, "guidance_scale": 3.0, "known_words": words}
    LatentDiffusion(components, name="tiny", defaults=defaults).save_pretrained(root / "base")
    return root / "base"


@pytest.fixture(scope="module")
def refs(root) -> Path:
    """Reference images of a held-out test subject (a star), rendered at 32 px."""
    subject = shapes.SubjectIdentity("star", "red", "ringed", "blue")
    assert subject.held_out
    rng = shapes.sample_rng(0, "test-refs", 0)
    folder = root / "refs"
    folder.mkdir()
    for i, scene in enumerate(shapes.subject_references(rng, subject, n=3, split="test")):
        render_image(scene, 32).save(folder / f"ref-{i}.png")
    return folder


def subject_args(base: Path, refs: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(base), "--subject-dir", str(refs), "--token", "sks",
        "--class-word", "star", "--output-dir", str(out), "--steps", "3",
        "--batch-size", "2", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def dreambooth(base, refs, root) -> Path:
    out = root / "db"
    run_recipe(
        "dreambooth_lora.py",
        *subject_args(base, refs, out, "--lr", "1e-2", "--num-class-images", "2"),
    )
    return out


@pytest.fixture(scope="module")
def dreambooth_text(base, refs, root) -> Path:
    """A second LoRA: text encoder too, rendered class images, another seed."""
    out = root / "db-text"
    run_recipe(
        "dreambooth_lora.py",
        *subject_args(base, refs, out, "--lr", "1e-2", "--num-class-images", "2"),
        *("--train-text-encoder", "--class-images", "rendered", "--seed", "1"),
        *("--snr-gamma", "none", "--lora-targets", "all"),
    )
    return out


@pytest.fixture(scope="module")
def inversion(base, refs, root) -> Path:
    out = root / "ti"
    run_recipe("textual_inversion.py", *subject_args(base, refs, out, "--lr", "5e-2"))
    return out


# --------------------------------------------------------------------------- DreamBooth-LoRA


def test_dreambooth_lora_end_to_end_then_lora_generation(base, dreambooth, tmp_path, capsys):
    """The recipe writes a diffusers LoRA file, its card and cached class images;
    ``--lora OUT`` changes the picture and ``--lora OUT:0`` is the base model exactly."""
    assert (dreambooth / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in dreambooth.glob("*.safetensors")) == [
        "pytorch_lora_weights.safetensors"
    ]
    facts = json.loads((dreambooth / "training.json").read_text())
    assert facts["steps"] == 3 and facts["class_images"] == "generated"
    assert facts["num_class_images"] == 2 and facts["lora_kb"] > 0
    card = (dreambooth / "README.md").read_text()
    assert "seed 0" in card and "3 steps" in card and facts["device"] in card
    index = (dreambooth / "class-images" / "index.jsonl").read_text().splitlines()
    assert len(index) == 2 and "star" in json.loads(index[0])["prompt"]

    opts = Options(seed=0, **OPTS)
    plain = load_generator(str(base)).generate(PROMPT, opts)
    full = load_generator(str(base), loras=[str(dreambooth)]).generate(PROMPT, opts)
    zero = load_generator(str(base), loras=[f"{dreambooth}:0"]).generate(PROMPT, opts)
    assert np.array_equal(pixels(plain.images), pixels(zero.images))
    assert not np.array_equal(pixels(plain.images), pixels(full.images))

    out = tmp_path / "sks.png"
    argv = ["generate", PROMPT, "--model", str(base), "--lora", str(dreambooth)]
    assert cli([*argv, "--seed", "0", "--steps", "2", "-o", str(out)]) == 0
    assert np.array_equal(pixels([Image.open(out).convert("RGB")]), pixels(full.images))


def test_two_loras_combine_with_scales(base, dreambooth, dreambooth_text):
    """A text-encoder LoRA loads too; LoRAs combine with their scales (a scale of 0
    removes one exactly)."""
    opts = Options(seed=1, **OPTS)
    a = load_generator(str(base), loras=[str(dreambooth)]).generate(PROMPT, opts)
    b = load_generator(str(base), loras=[str(dreambooth_text)]).generate(PROMPT, opts)
    a_only = load_generator(str(base), loras=[str(dreambooth), f"{dreambooth_text}:0"])
    both = load_generator(str(base), loras=[f"{dreambooth}:0.5", f"{dreambooth_text}:0.5"])
    assert np.array_equal(pixels(a_only.generate(PROMPT, opts).images), pixels(a.images))
    mixed = pixels(both.generate(PROMPT, opts).images)
    assert not np.array_equal(mixed, pixels(a.images))
    assert not np.array_equal(mixed, pixels(b.images))
    facts = json.loads((dreambooth_text / "training.json").read_text())
    assert facts["train_text_encoder"] and facts["class_images"] == "rendered"
    assert facts["snr_gamma"] is None  # --snr-gamma none: the plain loss
    # --lora-targets all: the ResNet convolutions and feed-forward layers carry LoRA too
    assert (
        facts["lora_targets"] == "all"
        and "convolutions" in (dreambooth_text / "README.md").read_text()
    )
    keys = safetensors_keys(dreambooth_text / "pytorch_lora_weights.safetensors")
    assert any(".conv1.lora_A" in k for k in keys) and any(".ff.net.2.lora_B" in k for k in keys)
    plain = safetensors_keys(dreambooth / "pytorch_lora_weights.safetensors")
    assert plain and not any(".conv1." in k or ".ff." in k for k in plain)
    assert json.loads((dreambooth / "training.json").read_text())["snr_gamma"] == 5.0


@pytest.fixture(scope="module")
def dit_base(root) -> Path:
    """A tiny random ldm whose denoiser is a PixArt DiT, saved as a directory."""
    import dataclasses

    torch.manual_seed(0)
    cfg = dataclasses.replace(LDM_PRESETS["tiny"], denoiser="dit")
    components = build_components(cfg, load_text_tokenizer("shapes-bpe"))
    words = json.loads(SHAPES_LDM.read_text())["known_words"]
    defaults = {"steps": 2, "guidance_scale": 3.0, "known_words": words}
    LatentDiffusion(components, name="tiny-dit", defaults=defaults).save_pretrained(root / "dit")
    return root / "dit"


@pytest.fixture(scope="module")
def dit_dreambooth(dit_base, refs, root) -> Path:
    out = root / "db-dit"
    run_recipe(
        "dreambooth_lora.py",
        *subject_args(dit_base, refs, out, "--lr", "1e-2", "--num-class-images", "2"),
        "--train-text-encoder",
    )
    return out


def test_dreambooth_lora_on_a_dit_loads_where_diffusers_has_no_loader(
    dit_base, dit_dreambooth, dreambooth, base
):
    """DreamBooth-LoRA adapts a PixArt DiT too: the file holds ``transformer.`` and
    ``text_encoder.`` keys (diffusers' SD3 layout); ``--lora`` loads it onto PixArt's
    pipeline, which diffusers gives no LoRA loader, with scales; a UNet's LoRA and a DiT's
    are refused by each other's models by name."""
    keys = safetensors_keys(dit_dreambooth / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in keys} == {"transformer", "text_encoder"}
    assert any(".attn2.to_k.lora_A." in k for k in keys)
    facts = json.loads((dit_dreambooth / "training.json").read_text())
    assert facts["denoiser"] == "PixArtTransformer2DModel"
    assert "DiT attention projections" in (dit_dreambooth / "README.md").read_text()

    opts = Options(seed=0, **OPTS)
    plain = pixels(load_generator(str(dit_base)).generate(PROMPT, opts).images)
    loaded = load_generator(str(dit_base), loras=[str(dit_dreambooth)])
    full = pixels(loaded.generate(PROMPT, opts).images)
    # both parts of the file were loaded: the transformer's and the text encoder's
    for part in (loaded.components.denoiser, loaded.components.text_encoder):
        assert "anygen_lora0" in part.peft_config, type(part).__name__
    zero = load_generator(str(dit_base), loras=[f"{dit_dreambooth}:0"]).generate(PROMPT, opts)
    assert np.array_equal(plain, pixels(zero.images))
    assert not np.array_equal(plain, full)
    # a second adapter at scale 0 leaves the first one's picture as it was
    pair = load_generator(str(dit_base), loras=[str(dit_dreambooth), f"{dit_dreambooth}:0"])
    assert np.array_equal(pixels(pair.generate(PROMPT, opts).images), full)

    with pytest.raises(CheckpointError, match="starts? with none of transformer"):
        load_generator(str(dit_base), loras=[str(dreambooth)])
    with pytest.raises(CheckpointError, match="does not fit"):
        load_generator(str(base), loras=[str(dit_dreambooth)])


def test_peft_loaded_dit_lora_equals_the_merged_weights(dit_base, dit_dreambooth, root):
    """Loaded through peft at scale s, each adapted projection computes W + s (alpha / r)
    B A: the transformer's output equals that of a copy whose weights were merged by hand
    from the file."""
    import copy

    from safetensors import safe_open

    from anygen.pipelines.lora import load_loras

    scale = 0.7
    model = load_generator(str(dit_base), dtype="fp32").components.denoiser.eval()
    merged = copy.deepcopy(model)
    file = dit_dreambooth / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    factor = scale * meta["transformer.lora_alpha"] / meta["transformer.r"]
    with torch.no_grad():
        for key, down in state.items():
            if key.startswith("transformer.") and key.endswith(".lora_A.weight"):
                name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                up = state[key.replace("lora_A", "lora_B")]
                merged.get_submodule(name).weight += factor * (up @ down)
    assert load_loras(model, [f"{file}:{scale}"]) == ["anygen_lora0"]

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 6, model.config.caption_channels, generator=g)
    t = torch.tensor([10, 500])
    plain = load_generator(str(dit_base), dtype="fp32").components.denoiser.eval()
    with torch.no_grad():
        ours, want, before = (
            m(x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]
            for m in (model, merged, plain)
        )
    assert torch.allclose(ours, want, atol=1e-5)
    assert not torch.allclose(ours, before, atol=1e-4)  # the adapter changes the output

    # a file without diffusers' metadata (peft's own save_file): the config is inferred
    # from the weights, alpha = rank, which is what the recipe trained with
    from safetensors.torch import save_file

    assert meta["transformer.lora_alpha"] == meta["transformer.r"]
    bare = root / "bare.safetensors"
    save_file(state, str(bare))
    other = load_generator(str(dit_base), dtype="fp32").components.denoiser.eval()
    load_loras(other, [f"{bare}:{scale}"])
    with torch.no_grad():
        again = other(x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]
    assert torch.equal(again, ours)
    save_file({"transformer.proj_out.weight": torch.zeros(4, 4)}, str(bare))
    with pytest.raises(CheckpointError, match="bare.safetensors does not fit.*no lora_A"):
        load_loras(other, [str(bare)])


def test_subject_loss_weighting_follows_snr_gamma(base):
    """SubjectTrainer's loss is denoiser_loss at its snr_gamma (None: unweighted), for the
    instance images and the prior alike."""
    from anygen.models.ldm import denoiser_loss
    from anygen.training.subjects import SubjectTrainer, sample_latents

    c = load_generator(str(base), dtype="fp32").components
    moments = torch.rand(16, 8, 4, 4, generator=torch.Generator().manual_seed(0))  # mean, std
    ids = torch.randint(0, 100, (16, 8), generator=torch.Generator().manual_seed(1))
    batch = {"instance": moments, "instance_ids": ids}

    def trainer_loss(gamma):
        torch.manual_seed(2)
        return SubjectTrainer(c.denoiser, c.text_encoder, c.scheduler, 0.0, gamma)(batch)["loss"]

    def reference(gamma):
        torch.manual_seed(2)
        latents = sample_latents(moments)
        return denoiser_loss(
            c.denoiser, c.text_encoder, c.scheduler, latents, ids, snr_gamma=gamma
        )["loss"]

    with torch.no_grad():
        plain, weighted = trainer_loss(None), trainer_loss(5.0)
        assert torch.equal(plain, reference(None))
        assert torch.equal(weighted, reference(5.0))
        assert not torch.allclose(plain, weighted)
        prior = dict(batch, prior=moments.flip(0), prior_ids=ids.flip(0))
        torch.manual_seed(2)
        both = SubjectTrainer(c.denoiser, c.text_encoder, c.scheduler, 0.5, None)(prior)
        assert torch.equal(both["instance"], plain)
        assert torch.allclose(both["loss"], both["instance"] + 0.5 * both["prior"])


@pytest.mark.parametrize("value", ["0", "-1", "fast"])
def test_bad_snr_gamma_is_refused_by_name(base, refs, tmp_path, capsys, value):
    args = subject_args(base, refs, tmp_path / "out", "--snr-gamma", value)
    reset_accelerate()
    with pytest.raises(SystemExit) as exit_:
        cli(["train", str(RECIPES / "dreambooth_lora.py"), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--snr-gamma" in err and repr(value) in err
    assert not (tmp_path / "out").exists()


def test_class_images_are_reused_for_the_same_request(base, refs, dreambooth, root):
    """A second subject of the same class reuses the class images (the bench relies on it)."""
    index = dreambooth / "class-images" / "index.jsonl"
    before = index.stat().st_mtime_ns
    out = root / "db-again"
    run_recipe(
        "dreambooth_lora.py",
        *subject_args(base, refs, out, "--num-class-images", "2", "--steps", "1"),
        *("--class-dir", str(dreambooth / "class-images")),
    )
    assert index.stat().st_mtime_ns == before
    assert json.loads((out / "training.json").read_text())["class_images_s"] < 1.0


def test_subject_suite_on_an_ldm_model_points_to_the_bench(base):
    from anygen.eval.run import evaluate_model

    with pytest.raises(UserInputError, match="no generate_subject.*subject_bench.py"):
        evaluate_model(str(base), "subject", n=1, progress=False)


# --------------------------------------------------------------------------- textual inversion


def test_textual_inversion_learns_only_the_identifier_row(base, inversion, tmp_path):
    """The file is diffusers' format, {"sks": (1, D)}; loading it replaces the row of the
    tokenizer's own ``sks`` token and nothing else, changes prompts that name the
    identifier and leaves prompts without it exactly as they were."""
    from safetensors.torch import load_file

    saved = load_file(inversion / "learned_embeds.safetensors")
    assert list(saved) == ["sks"] and saved["sks"].shape == (1, 32)
    facts = json.loads((inversion / "training.json").read_text())
    assert facts["token_added"] is False and facts["init_word"] == "star"

    plain = load_generator(str(base))
    taught = load_generator(str(base), embeddings=[str(inversion)])
    tok = plain.components.tokenizer
    sks = tok("sks", add_special_tokens=False).input_ids[0]
    before = plain.components.text_encoder.get_input_embeddings().weight
    after = taught.components.text_encoder.get_input_embeddings().weight
    assert (before != after).any(dim=1).nonzero().flatten().tolist() == [sks]
    assert torch.equal(after[sks], saved["sks"][0])
    star = before[tok("star", add_special_tokens=False).input_ids[0]]
    assert not torch.equal(after[sks], star)  # it learnt, starting from "star"
    assert len(taught.components.tokenizer) == len(tok)

    opts = Options(seed=0, **OPTS)
    for prompt, changes in ((PROMPT, True), ("a red circle above a blue square", False)):
        a, b = plain.generate(prompt, opts), taught.generate(prompt, opts)
        assert np.array_equal(pixels(a.images), pixels(b.images)) != changes, prompt

    out = tmp_path / "ti.png"
    argv = ["generate", PROMPT, "--model", str(base), "--embedding", str(inversion)]
    assert cli([*argv, "--seed", "0", "--steps", "2", "-o", str(out)]) == 0
    expected = taught.generate(PROMPT, opts).images
    assert np.array_equal(pixels([Image.open(out).convert("RGB")]), pixels(expected))


def test_textual_inversion_on_a_dit(dit_base, refs, root):
    """Textual inversion needs nothing of the denoiser: on a PixArt DiT base the learnt row
    loads with ``--embedding`` and changes only prompts that name the identifier."""
    out = root / "ti-dit"
    run_recipe("textual_inversion.py", *subject_args(dit_base, refs, out, "--lr", "5e-2"))
    plain = load_generator(str(dit_base))
    taught = load_generator(str(dit_base), embeddings=[str(out)])
    opts = Options(seed=0, **OPTS)
    for prompt, changes in ((PROMPT, True), ("a red circle above a blue square", False)):
        a, b = plain.generate(prompt, opts), taught.generate(prompt, opts)
        assert np.array_equal(pixels(a.images), pixels(b.images)) != changes, prompt


def test_textual_inversion_with_a_new_token_loads_in_diffusers_too(base, refs, root):
    """An identifier the tokenizer does not hold whole is added as a new token; the file
    then loads with diffusers' own load_textual_inversion to the same embedding."""
    out = root / "ti-new"
    run_recipe("textual_inversion.py", *subject_args(base, refs, out), "--token", "<my-star>")
    assert json.loads((out / "training.json").read_text())["token_added"] is True

    ours = load_generator(str(base), embeddings=[str(out / "learned_embeds.safetensors")])
    theirs = load_generator(str(base))
    pipe = theirs.to_diffusers()
    pipe.load_textual_inversion(str(out))
    for gen in (ours, theirs):
        tok = gen.components.tokenizer
        assert tok.convert_tokens_to_ids("<my-star>") == len(tok) - 1
    a = ours.components.text_encoder.get_input_embeddings().weight
    b = theirs.components.text_encoder.get_input_embeddings().weight
    assert torch.equal(a, b)
    opts = Options(seed=0, **OPTS)
    with_token = ours.generate("the <my-star> star", opts)
    assert np.array_equal(
        pixels(with_token.images), pixels(theirs.generate("the <my-star> star", opts).images)
    )


def test_embedding_refusals(base, inversion, tmp_path):
    pickle = tmp_path / "learned_embeds.bin"
    pickle.write_bytes(b"not tensors")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_generator(str(base), embeddings=[str(pickle)])
    with pytest.raises(
        CheckpointError, match=r"no learned_embeds.safetensors.*learned_embeds\.bin"
    ):
        load_generator(str(base), embeddings=[str(tmp_path)])
    from anygen.pipelines.embeddings import save_embeddings

    save_embeddings(tmp_path / "wide", {"sks": torch.zeros(1, 48)})
    with pytest.raises(CheckpointError, match="width 48.*width 32"):
        load_generator(str(base), embeddings=[str(tmp_path / "wide")])


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "subject directory {refs}-missing does not exist"),
        ("empty", "no images (.png, .jpg, .jpeg, .webp, .bmp) in the subject directory"),
        ("class", "unknown class word 'dog': the base model"),
        ("same", "the identifier and the class word are both 'star'"),
    ],
)
@pytest.mark.parametrize("recipe", ["dreambooth_lora.py", "textual_inversion.py"])
def test_bad_subject_input_is_named_in_one_line(
    base, refs, tmp_path, capsys, recipe, case, message
):
    folder = {"missing": Path(f"{refs}-missing"), "empty": tmp_path / "empty"}.get(case, refs)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    args = subject_args(base, folder, tmp_path / "out")
    if case == "class":
        args[args.index("--class-word") + 1] = "dog"
    if case == "same":
        args[args.index("--token") + 1] = "star"
    reset_accelerate()
    assert cli(["train", str(RECIPES / recipe), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message.format(refs=refs) in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- instruct edit


def test_widened_unet_computes_what_the_original_did():
    torch.manual_seed(0)
    components = build_components(LDM_PRESETS["tiny"], load_text_tokenizer("shapes-bpe"))
    unet = components.denoiser
    x, states = torch.randn(2, 4, 16, 16), torch.randn(2, 24, 32)
    with torch.no_grad():
        before = unet(x, 10, encoder_hidden_states=states).sample
        widen_denoiser_inputs(unet, 4)
        after = unet(torch.cat([x, torch.randn(2, 4, 16, 16)], 1), 10, states).sample
    assert unet.config.in_channels == 8 and unet.conv_in.in_channels == 8
    assert torch.allclose(before, after, atol=1e-6)
    with pytest.raises(UserInputError, match="extra_channels"):
        widen_denoiser_inputs(unet, 0)


def test_conditioning_dropout_shares():
    from anygen.training import load_recipe

    recipe = load_recipe(RECIPES / "instruct_edit.py")
    items = [{"instruction": "make the red circle blue"}] * 6000
    data = recipe.ConditioningDropout(items, 0.05, seed=0)
    rows = [data[i] for i in range(len(data))]
    no_text = np.array([r["instruction"] == "" for r in rows])
    no_image = np.array([float(r["keep_image"]) == 0.0 for r in rows])
    for share in (no_text & ~no_image, no_text & no_image, ~no_text & no_image):
        assert 0.035 < share.mean() < 0.065


def train_editor(base: Path, out: Path, select_n: int) -> Path:
    """A 3-step editor from ``base`` whose defaults are chosen on ``select_n`` edits."""
    run_recipe(
        "instruct_edit.py",
        *("--model", str(base), "--output-dir", str(out), "--steps", "3"),
        *("--batch-size", "4", "--lr", "1e-2", "--eval-n", "1", "--sample-steps", "2"),
        *("--select-n", str(select_n)),
    )
    return out / "model"


@pytest.fixture(scope="module")
def editor(base, root) -> Path:
    return train_editor(base, root / "edit", select_n=2)


def test_instruct_edit_recipe_makes_a_diffusers_editor(editor, tmp_path, capsys):
    """The directory is a StableDiffusionInstructPix2PixPipeline with an 8-channel UNet;
    load_generator runs it on the diffusers wrapper with its anygen.json defaults; edits
    are the input's size, deterministic under a seed, and image guidance matters."""
    from anygen.training import load_recipe

    index = json.loads((editor / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInstructPix2PixPipeline"
    unet_config = json.loads((editor / "unet" / "config.json").read_text())
    assert unet_config["in_channels"] == 8
    assert "_name_or_path" not in unet_config  # not the base model's folder
    facts = json.loads((editor / "training.json").read_text())
    assert facts["steps"] == 3 and facts["s_per_step"] > 0 and "shapes_eval_edit_overall" in facts
    assert "seed 0" in (editor / "README.md").read_text()
    selection = facts["sampling_selection"]
    grid = load_recipe(RECIPES / "instruct_edit.py").EDIT_GUIDANCE_GRID
    assert selection["n"] == 2 and len(grid) == 9  # text 2, 4, 7.5 x image 1.5, 2.5, 3.5
    scored = [
        {k: v for k, v in row.items() if k != "validation_overall"} for row in selection["grid"]
    ]
    assert scored == list(grid)  # every setting of the grid scored, in order
    defaults = json.loads((editor / "anygen.json").read_text())
    chosen = selection["chosen"]
    assert {k: defaults[k] for k in chosen} == chosen
    assert "validation edits (shapes-eval edit, seed 1000" in (editor / "README.md").read_text()

    gen = load_generator(str(editor))
    assert type(gen).__name__ == "DiffusersTextToImage" and gen.is_editor
    scene = shapes.sample_edit(shapes.sample_rng(0, "test-edit", 0), "test")
    source = render_image(scene.source, 32)
    opts = dict(OPTS, seed=3)
    a = gen.edit(source, scene.instruction, Options(**opts))
    b = gen.edit(source, scene.instruction, Options(**opts))
    c = gen.edit(source, scene.instruction, Options(image_guidance_scale=3.0, **opts))
    assert a.images[0].size == (32, 32)
    assert a.settings["image_guidance_scale"] == chosen["image_guidance_scale"]
    assert a.settings["guidance_scale"] == chosen["guidance_scale"] and a.settings["steps"] == 2
    assert np.array_equal(pixels(a.images), pixels(b.images))
    assert not np.array_equal(pixels(a.images), pixels(c.images))
    with pytest.raises(UserInputError, match="image-editing pipeline"):
        gen.generate("a red circle", Options(**OPTS))

    image, out = tmp_path / "source.png", tmp_path / "edited.png"
    source.save(image)
    argv = ["edit", str(image), scene.instruction, "--model", str(editor), "--seed", "3"]
    assert cli([*argv, "--steps", "2", "-o", str(out)]) == 0
    assert np.array_equal(pixels([Image.open(out).convert("RGB")]), pixels(a.images))


def test_instruct_edit_resume_of_a_finished_run_keeps_its_training_time(base, tmp_path, capsys):
    """Resuming a finished run trains nothing, saves the editor again with the new defaults,
    and its card keeps the run's training time (from metrics.jsonl), not the resume's; a
    resume from another base (another VAE) is refused."""
    run = ("--output-dir", str(tmp_path / "run"), "--batch-size", "2", "--steps", "20")
    run += ("--eval-n", "0", "--select-n", "0", "--sample-steps", "2")
    run_recipe("instruct_edit.py", "--model", str(base), *run)
    before = json.loads((tmp_path / "run" / "model" / "training.json").read_text())
    run_recipe("instruct_edit.py", "--model", str(base), *run, "--resume", "--guidance", "6.0")
    after = json.loads((tmp_path / "run" / "model" / "training.json").read_text())
    assert before["train_s"] > 0 and after["train_s"] == before["train_s"]
    assert after["s_per_step"] == before["s_per_step"] > 0
    defaults = json.loads((tmp_path / "run" / "model" / "anygen.json").read_text())
    assert defaults["guidance_scale"] == 6.0
    recorded = json.loads((tmp_path / "run" / "train" / "base.json").read_text())
    assert recorded == {"model": str(base), "fingerprint": after["base_fingerprint"]}

    other = load_generator(str(base), dtype="fp32")
    with torch.no_grad():
        next(other.components.vae.parameters()).add_(1.0)
    other.save_pretrained(tmp_path / "other")
    reset_accelerate()
    argv = ["train", str(RECIPES / "instruct_edit.py"), "--model", str(tmp_path / "other")]
    assert cli([*argv, *run, "--resume"]) == 2
    assert "whose VAE or tokenizer differs from --model" in capsys.readouterr().err


def test_instruct_edit_snr_floor_trains_the_layout_steps_of_a_zero_terminal_snr_base(
    tmp_path, capsys
):
    """On a zero-terminal-SNR v-prediction base (as shapes-dit), the last timestep is pure
    noise, where Min-SNR weighs the loss 0: terminal rows teach nothing unless --snr-floor
    lifts that weight. The recipe refuses --terminal-fraction without a floor before it
    trains, and a run with both records them in training.json and its card."""
    import dataclasses

    from anygen.data.datasets import ShapesEditDataset
    from anygen.models.ldm import tokenize
    from anygen.training import load_recipe

    torch.manual_seed(0)
    cfg = dataclasses.replace(
        LDM_PRESETS["tiny"], denoiser="dit", prediction_type="v_prediction", zero_terminal_snr=True
    )
    components = build_components(cfg, load_text_tokenizer("shapes-bpe"))
    words = json.loads(SHAPES_LDM.read_text())["known_words"]
    defaults = {"steps": 2, "guidance_scale": 3.0, "known_words": words}
    LatentDiffusion(components, name="zsnr", defaults=defaults).save_pretrained(tmp_path / "base")

    # the loss itself: all rows at the last timestep weigh 0 without the floor, not with it
    recipe = load_recipe(RECIPES / "instruct_edit.py")
    widen_denoiser_inputs(components.denoiser, components.vae.config.latent_channels)
    c = components
    items = ShapesEditDataset(2, seed=0, split="train", size=32)
    batch = {
        "source": torch.stack([items[i]["source"] for i in range(2)]),
        "target": torch.stack([items[i]["target"] for i in range(2)]),
        "keep_image": torch.ones(2),
        "input_ids": tokenize(c.tokenizer, [items[i]["instruction"] for i in range(2)]),
    }
    for floor, zero in ((None, True), (1.0, False)):
        trainer = recipe.EditTrainer(
            c.denoiser, c.text_encoder, c.vae, c.scheduler, snr_floor=floor, terminal_fraction=1.0
        )
        torch.manual_seed(1)
        with torch.no_grad():
            loss = float(trainer(batch)["loss"])
        assert (loss == 0.0) == zero, (floor, loss)

    run = ("--model", str(tmp_path / "base"), "--output-dir", str(tmp_path / "run"))
    run += ("--batch-size", "2", "--steps", "2", "--eval-n", "0", "--select-n", "0")
    reset_accelerate()
    assert (
        cli(["train", str(RECIPES / "instruct_edit.py"), *run, "--terminal-fraction", "0.5"]) == 2
    )
    assert "pass --snr-floor" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    reset_accelerate()
    assert cli(["train", str(RECIPES / "instruct_edit.py"), *run, "--snr-floor", "0"]) == 2
    assert "--snr-floor must be positive, got 0.0" in capsys.readouterr().err

    reset_accelerate()
    with pytest.raises(SystemExit) as exit_:  # argparse's error: usage, then the line
        cli(["train", str(RECIPES / "instruct_edit.py"), *run, "--change-weight", "0"])
    assert exit_.value.code == 2
    assert "--change-weight must be > 0, got 0.0" in capsys.readouterr().err

    weighting = ("--snr-floor", "1", "--terminal-fraction", "0.5", "--change-weight", "4")
    run_recipe("instruct_edit.py", *run, *weighting)
    facts = json.loads((tmp_path / "run" / "model" / "training.json").read_text())
    assert (facts["snr_floor"], facts["terminal_fraction"], facts["change_weight"]) == (1, 0.5, 4)
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "SNR floor 1.0, 0.5 of each batch at the last timestep, changed positions" in card


def test_change_weights_weigh_the_positions_an_edit_changes_and_their_neighbours():
    from anygen.training import load_recipe

    recipe = load_recipe(RECIPES / "instruct_edit.py")
    source = torch.full((2, 3, 32, 32), -1.0)
    target = source.clone()
    target[0, 1, 8:12, 8:12] = 0.5  # the pixels of latent position (2, 2) of 8 x 8
    target[1, :, 31, 0] = -1.0 + recipe.CHANGED / 2  # below the threshold: unchanged
    w = recipe.change_weights(source, target, (8, 8), 5.0)
    want = torch.ones(2, 1, 8, 8)
    want[0, 0, 1:4, 1:4] = 5.0
    assert torch.equal(w, want)


def test_eval_edit_suite_runs_on_the_editor(editor, capsys, cli_edit_eval):
    from anygen.eval.run import evaluate_model

    report = evaluate_model(str(editor), "edit", n=2, options=Options(steps=2), progress=False)
    assert len(report.records) == 2 and report.meta["suite"] == "edit"
    assert report.meta["steps"] == 2  # the options reached the editor's settings
    assert all(r.ok or r.reasons for r in report.records)  # a failure says why

    # --image-guidance reaches the editor from the command line, and only the edit suite
    assert report.meta["image_guidance_scale"] is None
    cli_edit_eval(editor, "--image-guidance", 3.0)
    argv = ["eval", "--model", str(editor), "--suite", "edit", "--n", "2", "--steps", "2"]
    capsys.readouterr()
    assert cli([*argv, "--image-guidance", "-1"]) == 2
    assert "image guidance scale must be >= 0, got -1.0" in capsys.readouterr().err
    assert cli(["eval", "--model", str(editor), "--suite", "t2i", "--image-guidance", "2"]) == 2
    assert "--image-guidance applies to the edit suite, not to the t2i suite" in (
        capsys.readouterr().err
    )


# --------------------------------------------------------------------------- similarities

CHARS = list(string.ascii_lowercase + string.digits + " .,'<>-")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> tuple[Path, Path]:
    """Tiny random CLIP and DINOv2 checkpoints with their processors, saved to disk."""
    from transformers import (
        BitImageProcessor,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        Dinov2Config,
        Dinov2Model,
    )

    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=48)
    text = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=48, bos_token_id=0, eos_token_id=1,
        pad_token_id=1,
    )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8,
    )  # fmt: skip
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    ).save_pretrained(root / "clip")
    crop = {"height": 32, "width": 32}
    CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=crop),
        tokenizer=tok,
    ).save_pretrained(root / "clip")
    dino = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    Dinov2Model(dino).save_pretrained(root / "dino")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size=crop).save_pretrained(root / "dino")
    return root / "clip", root / "dino"


def test_clip_and_dino_similarities(encoders, tmp_path):
    from anygen.eval.similarity import ClipSimilarity, DinoSimilarity, without_identifier

    clip, dino = ClipSimilarity(encoders[0]), DinoSimilarity(encoders[1])
    red = Image.new("RGB", (64, 64), (220, 30, 30))
    noise = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    for scorer in (clip, dino):
        assert scorer.image_similarity([red], [red]) == pytest.approx(1.0, abs=1e-5)
        assert scorer.image_similarity([red], [noise]) < 0.999
    same = clip.text_similarity([red], ["the circle"])
    assert -1.0 <= same <= 1.0
    assert same == pytest.approx(clip.text_similarity([red], ["the circle"]))
    assert clip.text_similarity([red], ["a blue square"]) != pytest.approx(same)
    assert without_identifier("the sks circle to the left of a blue square", "sks") == (
        "the circle to the left of a blue square"
    )
    with pytest.raises(CheckpointError, match="cannot load the DINO model"):
        DinoSimilarity(tmp_path)
    with pytest.raises(CheckpointError, match="holds a 'clip' model, not a DINO one"):
        DinoSimilarity(encoders[0])
    with pytest.raises(UserInputError, match="2 images but 1 texts"):
        clip.text_similarity([red, red], ["x"])


def test_subject_bench_prints_a_table(base, encoders, tmp_path, capsys):
    """The benchmark end to end on one held-out subject, one step of each recipe."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "subject_bench", ROOT / "benchmarks" / "subject_bench.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    reset_accelerate()
    argv = ["--output-dir", str(tmp_path), "--model", str(base), "--k", "1", "--steps", "1"]
    argv += ["--ti-steps", "2"]
    argv += ["--prompts", "1", "--num-class-images", "2"]
    argv += ["--clip", str(encoders[0]), "--dino", str(encoders[1])]
    with pytest.raises(UserInputError, match=f"--in-context {base}: this model cannot take"):
        bench.main([*argv, "--in-context", str(base)])  # refused before any fine-tuning
    assert not (tmp_path / "subjects").exists()
    argv += ["--in-context", "shapes-fusion"]  # in context: the references in its sequence
    assert bench.main(argv) == 0
    reset_accelerate()
    table = capsys.readouterr().out
    rows = ("base (no fine-tuning)", "DreamBooth-LoRA", "textual inversion")
    for row in (*rows, "in context: shapes-fusion"):
        assert row in table
    assert "CLIP-I" in table and "DINO" in table and "file KB" in table
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["recipe"] for r in results["records"]] == [*rows, "in context: shapes-fusion"]
    assert all(r["identity"] and "clip_t" in r for r in results["records"])
    # the in-context row is the model's own generate_subject on the subject's references
    drawn = results["records"][-1]
    assert (drawn["finetune_s"], drawn["file_kb"]) == (0.0, 0.0)
    ((_, sample),) = bench.pick_subjects(1, 0, True)
    fusion = load_generator("shapes-fusion", dtype="fp32")  # 64 px; the tiny base draws 32
    refs = [render_image(s, fusion.default_size) for s in sample.references]
    expected = fusion.generate_subject(refs, drawn["prompt"], Options(seed=drawn["seed"]))
    saved = Image.open(tmp_path / "subjects" / "00" / "in-context-shapes-fusion-0.png")
    assert saved.size == (64, 64) and np.array_equal(pixels([saved]), pixels(expected.images))

    (run,) = results["finetune"]  # what each recipe ran with: the steps asked, the rest theirs
    assert run["dreambooth"]["steps"] == 1 and run["textual_inversion"]["steps"] == 2
    assert run["dreambooth"]["num_class_images"] == 2
    defaults = load_recipe_defaults("dreambooth_lora.py")
    assert run["dreambooth"]["rank"] == defaults.rank
    assert run["dreambooth"]["learning_rate"] == defaults.lr

    # --finetune with no names: the base and in-context rows only, the same pictures
    lean = tmp_path / "lean"
    assert bench.main([*argv[2:], "--output-dir", str(lean), "--finetune"]) == 0
    lean_results = json.loads((lean / "results.json").read_text())
    assert [r["recipe"] for r in lean_results["records"]] == [rows[0], "in context: shapes-fusion"]
    assert lean_results["finetune"] == [{"subject": 0}] and not (lean / "class-images").exists()
    again = Image.open(lean / "subjects" / "00" / "in-context-shapes-fusion-0.png")
    assert np.array_equal(pixels([again]), pixels([saved]))


def test_widened_dit_computes_what_the_original_did():
    """A DiT's patch embedding takes the extra channels with zero weights; its output keeps
    the latent channels, also when its config left out_channels to follow in_channels."""
    import dataclasses

    from diffusers import PixArtTransformer2DModel

    from anygen.models.ldm import denoise, reads_source_image

    torch.manual_seed(0)
    cfg = dataclasses.replace(LDM_PRESETS["tiny"], denoiser="dit")
    dit = build_components(cfg, load_text_tokenizer("shapes-bpe")).denoiser.eval()
    x, states = torch.randn(2, 4, 16, 16), torch.randn(2, 24, 32)
    with torch.no_grad():
        before = denoise(dit, x, 10, states)
        widen_denoiser_inputs(dit, 4)
        after = denoise(dit, torch.cat([x, torch.randn(2, 4, 16, 16)], 1), 10, states)
    assert after.shape == (2, 4, 16, 16) and torch.allclose(before, after, atol=1e-6)
    assert dit.config.in_channels == 8 and dit.config.out_channels == 4
    assert reads_source_image(dit, 4) and not reads_source_image(dit, 8)
    inpainting = types.SimpleNamespace(config=types.SimpleNamespace(in_channels=9))
    assert not reads_source_image(inpainting, 4)
    # a config without out_channels: widening must not let the output follow the input
    loose = PixArtTransformer2DModel.from_config(
        {**dit.config, "in_channels": 4, "out_channels": None}
    )
    widen_denoiser_inputs(loose, 4)
    assert PixArtTransformer2DModel.from_config(loose.config).out_channels == 4
    with pytest.raises(UserInputError, match="cannot widen the inputs of a Linear"):
        widen_denoiser_inputs(torch.nn.Linear(2, 2), 4)


def test_instruct_edit_loop_equals_diffusers_instruct_pix2pix(tmp_path):
    """anygen's InstructPix2Pix loop (which a DiT editor runs) gives diffusers'
    StableDiffusionInstructPix2PixPipeline's pixels on the same UNet editor, seed and
    scheduler, with and without guidance and with a negative prompt."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    torch.manual_seed(0)
    components = build_components(LDM_PRESETS["tiny"], load_text_tokenizer("shapes-bpe"))
    widen_denoiser_inputs(components.denoiser, 4)
    with torch.no_grad():  # the source must matter: random weights on its channels
        components.denoiser.conv_in.weight[:, 4:].normal_(0, 0.1)
    ours = LatentDiffusion(components, name="tiny-edit", defaults={"scheduler": "dpm++"})
    scene = shapes.sample_edit(shapes.sample_rng(0, "test-edit", 0), "test")
    source = render_image(scene.source, 32)
    cases = [
        dict(guidance_scale=4.0, image_guidance_scale=2.5),
        dict(guidance_scale=4.0, image_guidance_scale=1.5, negative_prompt="a blue star"),
        dict(guidance_scale=1.0, image_guidance_scale=1.5),  # no guidance: one row
    ]
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.denoiser,
        scheduler=ours.sampler("dpm++"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for case in cases:
        got = ours.edit(source, scene.instruction, Options(seed=5, num_images=2, **OPTS, **case))
        want = pipe(
            prompt=[scene.instruction] * 2,
            image=[source] * 2,
            num_inference_steps=2,
            generator=[make_generator(5), make_generator(6)],
            output_type="np",
            **{k: ([v] * 2 if k == "negative_prompt" else v) for k, v in case.items()},
        ).images  # (2, 32, 32, 3) in [0, 1]
        assert got.settings["seeds"] == [5, 6]
        assert np.abs(pixels(got.images) / 255.0 - want).max() < 2 / 255, case


@pytest.fixture(scope="module")
def dit_editor(dit_base, root) -> Path:
    return train_editor(dit_base, root / "edit-dit", select_n=1)


def test_instruct_edit_recipe_on_a_dit(dit_editor, tmp_path, capsys):
    """A DiT editor is a PixArt pipeline directory with an 8-channel transformer that
    anygen edits with (diffusers has no InstructPix2Pix pipeline for PixArt): loaded by
    load_generator, it edits deterministically, image guidance matters, --strength and
    text-to-image are refused in one line, and `anygen edit` writes the same pixels."""
    index = json.loads((dit_editor / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtAlphaPipeline"
    config = json.loads((dit_editor / "transformer" / "config.json").read_text())
    assert (config["in_channels"], config["out_channels"]) == (8, 4)
    facts = json.loads((dit_editor / "training.json").read_text())
    assert facts["denoiser"] == "DiT" and "shapes_eval_edit_overall" in facts
    assert "PixArtAlphaPipeline" in (dit_editor / "README.md").read_text()
    defaults = json.loads((dit_editor / "anygen.json").read_text())
    chosen = facts["sampling_selection"]["chosen"]
    assert defaults["family"] == "ldm" and {k: defaults[k] for k in chosen} == chosen

    gen = load_generator(str(dit_editor))
    assert type(gen).__name__ == "LatentDiffusion" and gen.edits_by_instruction
    scene = shapes.sample_edit(shapes.sample_rng(0, "test-edit", 1), "test")
    source = render_image(scene.source, 32)
    opts = dict(OPTS, seed=3)
    a = gen.edit(source, scene.instruction, Options(**opts))
    b = gen.edit(source, scene.instruction, Options(**opts))
    c = gen.edit(source, scene.instruction, Options(image_guidance_scale=9.0, **opts))
    assert a.images[0].size == (32, 32) and a.settings["instruction"] == scene.instruction
    assert a.settings["image_guidance_scale"] == chosen["image_guidance_scale"]
    assert np.array_equal(pixels(a.images), pixels(b.images))
    assert not np.array_equal(pixels(a.images), pixels(c.images))
    with pytest.raises(UserInputError, match="strength means nothing to the instruction editor"):
        gen.edit(source, scene.instruction, Options(strength=0.5, **opts))
    with pytest.raises(UserInputError, match="is an instruction editor .*`anygen edit IMAGE"):
        gen.generate("a red circle", Options(**OPTS))
    with pytest.raises(UserInputError, match="not a multiple of 4"):
        gen.edit(source.resize((30, 30)), scene.instruction, Options(**opts))

    image, out = tmp_path / "source.png", tmp_path / "edited.png"
    source.save(image)
    argv = ["edit", str(image), scene.instruction, "--model", str(dit_editor), "--seed", "3"]
    assert cli([*argv, "--steps", "2", "-o", str(out)]) == 0
    assert np.array_equal(pixels([Image.open(out).convert("RGB")]), pixels(a.images))


def test_instruct_edit_bundles_fp16_weights_and_keeps_the_cards_history(
    dit_editor, dit_base, tmp_path
):
    """``--bundle`` writes the editor's fp16 weights under the bundled models, scores that
    copy, keeps the hand-written history of the card it replaces, and refuses to replace a
    bundled model that is not an instruction editor, before training anything."""
    import shutil

    from safetensors import safe_open

    from anygen.hub import card_metadata
    from anygen.training import load_recipe

    recipe = load_recipe(RECIPES / "instruct_edit.py")
    recipe.BUNDLED_MODELS = tmp_path / "assets"
    old = recipe.BUNDLED_MODELS / "shapes-edit"
    old.mkdir(parents=True)
    (old / "anygen.json").write_text('{"family": "ldm", "image_guidance_scale": 1.5}')
    (old / "model_index.json").write_text("{}")
    history = "<!-- anygen:history -->\n## Before\n\nan older editor.\n<!-- /anygen:history -->"
    (old / "README.md").write_text(f"# shapes-edit\n\n{history}\n")
    run = tmp_path / "run"
    shutil.copytree(dit_editor.parent, run)  # a finished run: --resume trains nothing
    argv = ["--model", str(dit_base), "--output-dir", str(run), "--resume", "--batch-size", "4"]
    argv += ["--steps", "3", "--lr", "1e-2", "--select-n", "0", "--eval-n", "1"]
    argv += ["--sample-steps", "2"]
    reset_accelerate()
    recipe.main([*argv, "--bundle"])
    reset_accelerate()
    card = (old / "README.md").read_text()
    assert history in card and "# Instruction editor" in card
    assert card_metadata(old)["name"] == "shapes-edit" and "--model shapes-edit" in card
    assert card_metadata(old)["summary"].startswith("instruction editor (InstructPix2Pix)")
    assert history not in (run / "model" / "README.md").read_text()
    weights = old / "transformer" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        assert f.get_tensor("pos_embed.proj.weight").dtype == torch.float16
    assert json.loads((old / "eval.json").read_text())["meta"]["model"] == "shapes-edit"
    facts = json.loads((old / "training.json").read_text())
    assert facts["bundled_as"] == "shapes-edit" and "shapes_eval_edit_overall" in facts
    scene = shapes.sample_edit(shapes.sample_rng(0, "test-edit", 2), "test")
    edited = load_generator(str(old)).edit(
        render_image(scene.source, 32), scene.instruction, Options(seed=0, **OPTS)
    )
    assert edited.images[0].size == (32, 32)

    (recipe.BUNDLED_MODELS / "shapes-ldm").mkdir()
    (recipe.BUNDLED_MODELS / "shapes-ldm" / "anygen.json").write_text('{"family": "ldm"}')
    with pytest.raises(UserInputError, match="shapes-ldm, which is not an instruction editor"):
        recipe.main(
            [*argv, "--output-dir", str(tmp_path / "new"), "--bundle", "--name", "shapes-ldm"]
        )
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif("shapes-edit" not in bundled_models("model"), reason="not bundled")
def test_bundled_shapes_edit_is_a_dit_editor_over_shapes_dits_vae():
    """shapes-edit widens shapes-dit's DiT and trains its text encoder; the VAE stayed
    frozen, so it is shapes-dit's, weight for weight; edits are seeded."""
    editor = load_generator("shapes-edit", dtype="fp32")
    base = load_generator("shapes-dit", dtype="fp32")
    assert editor.edits_by_instruction and not base.edits_by_instruction
    assert type(editor.components.denoiser).__name__ == "PixArtTransformer2DModel"
    ours, theirs = editor.components.vae.state_dict(), base.components.vae.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(v, theirs[k]) for k, v in ours.items())
    scene = shapes.sample_edit(shapes.sample_rng(0, "test-edit", 3), "test")
    source = render_image(scene.source, 64)
    a, b = (editor.edit(source, scene.instruction, Options(seed=1, **OPTS)) for _ in range(2))
    assert a.images[0].size == (64, 64) and np.array_equal(pixels(a.images), pixels(b.images))


@pytest.mark.slow
def test_bundled_shapes_edit_meets_its_bar():
    """Issue 7's bar on 100 held-out test edits: right >= 0.85, the untouched objects kept."""
    from anygen.eval.suites import run_edit

    editor = load_generator("shapes-edit", dtype="fp32")
    report = run_edit(
        lambda image, instruction, s: editor.edit(
            image, instruction, Options(seed=s, progress=False)
        ).images[0],
        n=100,
        seed=0,
        size=64,
        progress=False,
    )
    assert report.overall >= 0.85, report.table()


def test_choose_sampling_re_chooses_an_editors_guidance(dit_editor, tmp_path, capsys):
    """``recipes/choose_sampling.py --target edit`` scores each guidance pair on validation
    edits exactly as shapes-eval's edit suite does, writes its choice (or the plain pair)
    into a copy of the editor, with the table in the card; its flags are checked."""
    from anygen.eval.suites import run_edit

    out = tmp_path / "choice"
    argv = ["train", str(RECIPES / "choose_sampling.py"), "--model", str(dit_editor)]
    argv += ["--target", "edit", "--select-n", "2", "--seeds", "1000", "--margin", "1"]
    reset_accelerate()
    assert (
        cli([*argv, "--guidance", "2,6", "--image-guidance", "1.5", "--output-dir", str(out)]) == 0
    )
    choice = json.loads((out / "choice.json").read_text())
    assert [(r["guidance_scale"], r["image_guidance_scale"]) for r in choice["grid"]] == [
        (2.0, 1.5),
        (6.0, 1.5),
    ]
    editor = load_generator(str(dit_editor))
    for row in choice["grid"]:
        setting = {k: row[k] for k in ("guidance_scale", "image_guidance_scale")}
        report = run_edit(
            lambda image, instruction, s, setting=setting: editor.edit(
                image, instruction, Options(seed=s, progress=False, **setting)
            ).images[0],
            n=2,
            seed=1000,
            size=32,
            progress=False,
        )
        assert row["validation_right"] == sum(r.ok for r in report.records)
    plain = {k: editor.defaults[k] for k in ("guidance_scale", "image_guidance_scale")}
    assert {k: choice["plain"][k] for k in plain} == plain and choice["n"] == 2
    written = json.loads((out / "model" / "anygen.json").read_text())
    want = choice["chosen"] or plain
    assert {k: written[k] for k in want} == {k: want[k] for k in want}
    card = (out / "model" / "README.md").read_text()
    assert (
        "<!-- anygen:edit_reselection -->" in card and "validation edits (shapes-eval edit" in card
    )

    for flags, message in (
        (["--temperature", "0.5"], "--temperature: not for --target edit"),
        (
            ["--target", "defaults", "--image-guidance", "2"],
            "--image-guidance applies to --target edit",
        ),
    ):
        reset_accelerate()
        with pytest.raises(SystemExit):
            cli([*argv, *flags, "--output-dir", str(tmp_path / "no")])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_instruct_edit_refuses_a_corrupt_base_record(tmp_path):
    from anygen.training import load_recipe

    recipe = load_recipe(RECIPES / "instruct_edit.py")
    (tmp_path / recipe.BASE_FILE).write_text('{"model": "shapes-ldm"')
    with pytest.raises(UserInputError, match="is not a base record"):
        recipe.check_base(tmp_path, "shapes-ldm", "abc", resume=True)
    (tmp_path / recipe.BASE_FILE).write_text('{"model": "shapes-ldm", "fingerprint": "abc"}')
    recipe.check_base(tmp_path, "shapes-ldm", "abc", resume=True)  # the same base: no error
    with pytest.raises(UserInputError, match="differs from --model 'other'"):
        recipe.check_base(tmp_path, "other", "def", resume=True)


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--eval-n", "-1", "--eval-n must be >= 0"),
        ("--guidance", "-1", "--guidance and --image-guidance must be >= 0"),
        ("--image-guidance", "-2", "--guidance and --image-guidance must be >= 0"),
        ("--guidance", "6", "set the defaults only with --select-n 0"),
        ("--image-guidance", "2", "set the defaults only with --select-n 0"),
    ],
)
def test_instruct_edit_refuses_bad_numbers_before_training(flag, value, message, capsys):
    """Bad numbers, and a default guidance that selection (--select-n > 0, the default)
    would overwrite, are refused before any training."""
    from anygen.training import load_recipe

    recipe = load_recipe(RECIPES / "instruct_edit.py")
    with pytest.raises(SystemExit):
        recipe.parse_args(["--output-dir", "o", flag, value])
    assert message in capsys.readouterr().err
    args = recipe.parse_args(["--output-dir", "o", "--select-n", "0", "--guidance", "6"])
    assert (args.guidance, args.image_guidance) == (6.0, 1.5)


def test_an_a1111_embedding_file_names_its_word_by_the_file(tmp_path):
    from safetensors.torch import save_file

    from anygen.pipelines.embeddings import read_embeddings

    vectors = torch.randn(2, 32)
    save_file({"emb_params": vectors}, tmp_path / "my-style.safetensors")
    ((word, read),) = read_embeddings(tmp_path / "my-style.safetensors").items()
    assert word == "my-style" and torch.equal(read, vectors)
