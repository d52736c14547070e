"""recipes/ldm_vae_subjects.py: an ldm model's VAE learns patterned subjects, anchored."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from anygen.errors import UserInputError
from anygen.hub import card_metadata, set_front_matter, write_card_section
from anygen.models.ldm import LDM_PRESETS, build_components
from anygen.pipelines import Options
from anygen.pipelines.text_to_image import LatentDiffusion
from anygen.tokenizers.text import load_text_tokenizer
from anygen.training import load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "ldm_vae_subjects.py"


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(RECIPE)


@pytest.fixture(scope="module")
def tiny_fp16(tmp_path_factory):
    """A tiny ldm pipeline saved with fp16 weights and a card, as bundled models are."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(LDM_PRESETS["tiny"])
    model = LatentDiffusion(build_components(cfg, load_text_tokenizer("shapes-bpe")), name="tiny")
    card = "---\nname: tiny\nshapes_eval_t2i_overall: 0.123\n---\n# tiny\n\nIts story.\n"
    return model.save_pretrained(
        tmp_path_factory.mktemp("vs") / "tiny", card=card, dtype=torch.float16
    )


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_pictures_mix_subjects_and_plain_scenes(recipe):
    data = recipe.SubjectsAndScenes(400, seed=0, subjects=0.5)
    plain = [bool(data[i]["plain"]) for i in range(400)]
    assert 150 < plain.count(False) < 250  # about half are patterned subjects
    assert data[7]["image"].shape == (3, 64, 64) and torch.equal(data[7]["image"], data[7]["image"])
    assert all(bool(recipe.SubjectsAndScenes(20, 0, 0.0)[i]["plain"]) for i in range(20))
    assert not any(bool(recipe.SubjectsAndScenes(20, 0, 1.0)[i]["plain"]) for i in range(20))
    with pytest.raises(IndexError):
        data[400]


def test_anchor_measures_the_drift_of_plain_latents_only(recipe, tiny_fp16):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_fp16 / "vae", torch_dtype=torch.float32)
    trainer = recipe.AnchoredVae(vae, anchor=10.0, foreground_weight=4.0)
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    plain = torch.tensor([True, False, True, False])
    assert trainer(images, plain)["drift"].item() == 0.0  # it starts where it is anchored
    with torch.no_grad():
        vae.encoder.conv_in.bias += 0.5
    moved = trainer(images, plain)["drift"].item()
    assert moved > 0
    assert trainer(images, torch.zeros(4, dtype=torch.bool))["drift"].item() == 0.0
    assert not any(p.requires_grad for p in trainer.reference.parameters())


def test_recipe_changes_the_vae_alone_and_writes_its_card_section(tiny_fp16, tmp_path):
    out = tmp_path / "run"
    args = ["--model", str(tiny_fp16), "--output-dir", str(out), "--steps", "2",
            "--batch-size", "4", "--recon-n", "4", "--eval-n", "2"]  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "anygen", "train", str(RECIPE), *args],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    model = out / "model"
    for part in ("unet", "text_encoder"):  # untouched, byte for byte
        for f in (tiny_fp16 / part).iterdir():
            assert (model / part / f.name).read_bytes() == f.read_bytes()
    name = "diffusion_pytorch_model.safetensors"
    old, new = _tensors(tiny_fp16 / "vae" / name), _tensors(model / "vae" / name)
    assert old.keys() == new.keys() and all(t.dtype == torch.float16 for t in new.values())
    assert any(not torch.equal(old[k], new[k]) for k in old)
    assert "_name_or_path" not in json.loads((model / "vae" / "config.json").read_text())
    facts = json.loads((model / "vae_subjects.json").read_text())
    assert facts["steps"] == 2 and facts["reconstruction"]["after"]["subject_kept_n"] == 1
    card = (model / "README.md").read_text()
    assert "Its story." in card and card.count("<!-- anygen:vae_subjects -->") == 1
    meta = card_metadata(model)
    assert meta["vae_subjects"]["anchor"] == 10.0
    variance = 1 / json.loads((model / "vae" / "config.json").read_text())["scaling_factor"] ** 2
    assert meta["vae_subjects"]["latent_variance"] == pytest.approx(variance, abs=0.01)
    words = " ".join(card.split())  # the section is wrapped at 90 columns
    assert f"latent variance near {meta['vae_subjects']['latent_variance']:g})" in words
    scored = json.loads((model / "eval.json").read_text())
    assert scored["n"] == 2 and meta["shapes_eval_t2i_overall"] == round(scored["overall"], 3)
    image = LatentDiffusion.from_pretrained(model).generate(
        "a red circle", Options(steps=2, seed=0, progress=False)
    )
    assert image.images[0].size == (32, 32)  # the tiny preset's size


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--subjects", "1.5"], "--subjects must be in [0, 1], got 1.5"),
        (["--anchor", "-1"], "--anchor and --foreground-weight must be >= 0"),
        (["--recon-n", "2"], "--recon-n must be >= 4"),
    ],
)
def test_recipe_refuses_bad_settings(recipe, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        recipe.parse_args(["--output-dir", str(tmp_path), *extra])
    assert message in capsys.readouterr().err


def test_recipe_bundles_only_a_bundled_model(recipe, tiny_fp16, tmp_path):
    with pytest.raises(UserInputError, match="--bundle rewrites a bundled model; .* is not one"):
        recipe.main(["--model", str(tiny_fp16), "--output-dir", str(tmp_path / "r"), "--bundle"])
    assert not (tmp_path / "r").exists()  # refused before training


def test_write_card_section_replaces_what_it_wrote_before():
    card = "---\nname: m\nscore: 1\n---\n# m\n\ntext\n"
    once = write_card_section(card, "extra", {"a": 1}, "first")
    twice = write_card_section(once, "extra", {"a": 2}, "second")
    assert twice.startswith('---\nname: m\nscore: 1\nextra: {"a": 2}\n---\n# m\n\ntext\n')
    assert twice.count("<!-- anygen:extra -->") == 1 and "second" in twice and "first" not in twice
    assert write_card_section("# bare\n", "k", 1, "s").startswith("---\nk: 1\n---\n# bare")
    # a plain front-matter line: the old one dropped, the new one last, the others kept
    card = set_front_matter("---\na: 1\nscore: 0.5\n---\n# t\n", "score", "0.620")
    assert card == "---\na: 1\nscore: 0.620\n---\n# t\n"
    assert set_front_matter("# t\n", "score", "1") == "---\nscore: 1\n---\n# t\n"
