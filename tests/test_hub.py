"""anygen.hub: resolution, atomic checkpoints, safe loading, PretrainedMixin, packaging."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import anygen
from anygen import hub
from anygen.errors import CheckpointError, ModelNotFoundError
from anygen.hub import (
    PretrainedMixin,
    atomic_directory,
    bundled_models,
    card_metadata,
    load_config,
    load_state_dict,
    load_weights,
    resolve,
    save_pretrained,
)

REPO = Path(__file__).resolve().parents[1]


# -----------------------------------------------------------------------------
# resolution


def test_resolve_bundled_tokenizer_and_paths(tmp_path, monkeypatch):
    path = resolve("shapes-bpe")
    assert (path / "tokenizer.json").is_file()
    assert resolve("shapes-bpe", kind="tokenizer") == path
    assert "shapes-bpe" in bundled_models("tokenizer")
    assert "shapes-bpe" not in bundled_models("model")
    assert card_metadata("shapes-bpe")["recipe"] == "recipes/bpe_shapes.py"
    # local paths win and come back absolute
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve("ckpt") == tmp_path / "ckpt"
    assert resolve(tmp_path / "ckpt") == tmp_path / "ckpt"


def test_resolve_unknown_name_lists_bundled_names():
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'nonesuch'.*shapes-bpe"):
        resolve("nonesuch")
    with pytest.raises(ModelNotFoundError, match="not one of the bundled models"):
        resolve("shapes-bpe", kind="model")
    with pytest.raises(ModelNotFoundError, match="no such file or directory: ./missing-dir"):
        resolve("./missing-dir")
    with pytest.raises(ValueError, match="kind must be one of"):
        resolve("shapes-bpe", kind="pipeline")


def test_add_on_sources_are_files_folders_or_hub_ids_never_model_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lora").mkdir()
    assert hub.resolve_add_on("lora", "LoRA") == tmp_path / "lora"
    # a bundled model's name is not a LoRA, even though resolve() knows it
    assert resolve("shapes-ldm").is_dir()
    with pytest.raises(ModelNotFoundError, match=r"^no such LoRA file or folder: shapes-ldm \("):
        hub.resolve_add_on("shapes-ldm", "LoRA")
    with pytest.raises(
        ModelNotFoundError, match="no such embedding file or folder: x/y.safetensors"
    ):
        hub.resolve_add_on("x/y.safetensors", "embedding")
    with pytest.raises(ModelNotFoundError, match="empty LoRA name"):
        hub.resolve_add_on(" ", "LoRA")


def test_uncached_hub_id_offline_fails_fast_with_the_fix(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as info:
        resolve("anygen-test/not-cached")
    message = str(info.value)
    assert "anygen-test/not-cached is not in the Hugging Face cache" in message
    assert "`hf download anygen-test/not-cached`" in message
    assert "unset HF_HUB_OFFLINE" in message
    assert "\n" not in message


# -----------------------------------------------------------------------------
# checkpoints


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.emb.weight  # tied: one storage, two keys
        self.register_buffer("steps", torch.tensor([3, 4], dtype=torch.long))


def test_save_and_load_round_trip_with_tied_weights_and_dtype(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    out = save_pretrained(model, tmp_path / "ckpt", {"width": 4}, dtype=torch.float16)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind
    state = load_state_dict(out)
    assert state["emb.weight"].dtype == torch.float16
    assert state["steps"].dtype == torch.long  # only floating point is cast
    torch.testing.assert_close(state["head.weight"], model.emb.weight.half())
    config = json.loads((out / "config.json").read_text())
    assert config == {"_anygen_version": anygen.__version__, "_class_name": "Tied", "width": 4}
    fresh = Tied()
    load_weights(fresh, state)
    assert fresh.head.weight is fresh.emb.weight
    torch.testing.assert_close(fresh.emb.weight, model.emb.weight.half().float())


def test_save_replaces_a_checkpoint_but_never_other_folders(tmp_path):
    target = tmp_path / "ckpt"
    save_pretrained({"w": torch.zeros(2)}, target, {"v": 1})
    save_pretrained({"w": torch.ones(3)}, target, {"v": 2})
    assert load_state_dict(target)["w"].shape == (3,)
    assert load_config(target)["v"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]

    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(CheckpointError, match="refusing to replace .*photos"):
        save_pretrained({"w": torch.zeros(2)}, precious, {})
    assert [p.name for p in precious.iterdir()] == ["cat.jpg"]


def test_a_replaced_checkpoint_keeps_the_users_files_but_not_stale_weights(tmp_path):
    target = tmp_path / "ckpt"
    save_pretrained({"w": torch.zeros(2)}, target, {"v": 1})
    (target / "notes.md").write_text("my notes")
    (target / "README.md").write_text("---\nshapes_eval_t2i_overall: 0.9\n---\nold card")
    (target / "samples").mkdir()
    (target / "samples" / "0.png").write_bytes(b"png")
    (target / "old-shard.safetensors").write_bytes(b"stale")
    (target / "optimizer.bin").write_bytes(b"stale")
    (target / "model.bin.index.json").write_text("{}")
    (target / "generation_config.json").write_text("{}")
    (target / "tokenizer").mkdir()  # a component the new checkpoint leaves out
    (target / "tokenizer" / "tokenizer.json").write_text("{}")
    (target / "tokenizer" / "merges.txt").write_text("a b")
    save_pretrained({"w": torch.ones(3)}, target, {"v": 2})
    names = sorted(str(p.relative_to(target)) for p in target.rglob("*"))
    assert names == ["config.json", "model.safetensors", "notes.md", "samples", "samples/0.png"]
    assert (target / "notes.md").read_text() == "my notes"
    assert load_config(target)["v"] == 2  # the new checkpoint's files win
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]

    # a cache the writer owns whole keeps nothing of the old folder
    with atomic_directory(target, keep_other_files=False) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]


def test_a_save_that_cannot_keep_a_users_file_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import anygen.hub as hub

    target = tmp_path / "ckpt"
    save_pretrained({"w": torch.zeros(2)}, target, {"v": 1})
    (target / "notes.md").write_text("my notes")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(hub.os, "link", fail)
    monkeypatch.setattr(hub.shutil, "copy2", fail)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained({"w": torch.ones(3)}, target, {"v": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no .tmp-* left
    assert load_config(target)["v"] == 1 and (target / "notes.md").is_file()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_weights_get_the_umask_mode_like_their_config(tmp_path, umask):
    # safetensors writes 0o600 temporary files and renames them (safetensors#782)
    from anygen.pipelines.embeddings import save_embeddings

    old = os.umask(umask)
    try:
        out = save_pretrained({"w": torch.zeros(2)}, tmp_path / "ckpt", {"v": 1})
        embeds = save_embeddings(tmp_path / "ti", {"sks": torch.zeros(1, 4)})
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    modes = {
        p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777
        for p in [*out.iterdir(), embeds]
    }
    assert modes == {
        "ckpt/config.json": expected,
        "ckpt/model.safetensors": expected,
        "ti/learned_embeds.safetensors": expected,
    }


def test_failed_save_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    save_pretrained({"w": torch.zeros(2)}, target, {"v": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained({"w": torch.ones(2)}, target, {"v": 2})
    assert load_config(target)["v"] == 1
    torch.testing.assert_close(load_state_dict(target)["w"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_state_dict(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    with pytest.raises(
        CheckpointError, match=r"no model.safetensors in .*empty \(it holds: notes.txt\)"
    ):
        load_state_dict(empty)

    save_pretrained({"w": torch.randn(64, 64)}, tmp_path / "ckpt", {})
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated or corrupt"):
        load_state_dict(tmp_path / "ckpt")
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match=str(weights)):
        load_state_dict(weights)

    (tmp_path / "ckpt" / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_config(tmp_path / "ckpt")

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": ["a.safetensors"]}')
    with pytest.raises(CheckpointError, match="weight_map must map tensor names"):
        load_state_dict(sharded)


def test_pickle_refused_unless_allowed_and_then_weights_only(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    torch.save({"state_dict": {"w": torch.arange(3.0)}}, folder / "model.ckpt")
    with pytest.raises(CheckpointError, match="pickle checkpoint.*allow_pickle=True"):
        load_state_dict(folder)
    state = load_state_dict(folder, allow_pickle=True)
    torch.testing.assert_close(state["w"], torch.arange(3.0))

    # weights_only refuses arbitrary objects
    torch.save({"w": torch.zeros(1), "obj": Tied}, tmp_path / "evil.pt")
    with pytest.raises(
        CheckpointError, match=r"cannot read .*evil.pt with torch.load\(weights_only=True\)"
    ):
        load_state_dict(tmp_path / "evil.pt", allow_pickle=True)


def test_sharded_safetensors(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "model-00002-of-00002.safetensors")
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    state = load_state_dict(tmp_path)
    assert sorted(state) == ["a", "b"]
    assert torch.equal(state["a"], torch.ones(2)) and torch.equal(state["b"], torch.zeros(3))


def test_mismatched_weights_list_the_keys():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state = model.state_dict()
    state["0.weight"] = torch.zeros(5, 3)
    del state["1.bias"]
    state["2.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_weights(model, state, source="ckpt-dir")
    message = str(info.value)
    assert message.startswith("ckpt-dir does not match Sequential")
    assert "1 missing keys (1.bias)" in message
    assert "1 unexpected keys (2.weight)" in message
    assert "0.weight: checkpoint (5, 3) vs model (4, 3)" in message


# -----------------------------------------------------------------------------
# PretrainedMixin


@dataclass
class HeadConfig:
    sizes: tuple[int, ...] = (6,)


@dataclass
class TinyConfig:
    width: int = 8
    widths: tuple[int, ...] = (4, 6)
    act: str = "gelu"
    extra: list[int] = field(default_factory=list)
    head: HeadConfig = field(default_factory=HeadConfig)


TINY_PRESETS = {
    "tiny": TinyConfig(),
    "small": TinyConfig(width=16, widths=(8, 8), extra=[1], head=HeadConfig(sizes=(8, 2))),
}


class TinyNet(PretrainedMixin, nn.Module):
    config_class = TinyConfig

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.inp = nn.Linear(config.width, config.widths[0])
        self.out = nn.Linear(config.widths[0], config.widths[1])

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))  # (B, width) -> (B, widths[1])


def test_mixin_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TinyNet(TINY_PRESETS["small"])
    model.save_pretrained(tmp_path / "tiny", card="---\nrecipe: none\nseed: 0\n---\n# tiny\n")
    assert card_metadata(tmp_path / "tiny") == {"recipe": "none", "seed": 0}
    loaded = TinyNet.from_pretrained(tmp_path / "tiny", device="cpu")
    assert loaded.config == model.config  # tuples and the nested dataclass come back
    assert not loaded.training
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded(x), model(x))
    half = TinyNet.from_pretrained(tmp_path / "tiny", dtype=torch.bfloat16)
    assert half.inp.weight.dtype == torch.bfloat16


def test_mixin_refuses_unknown_fields_and_other_classes(tmp_path):
    TinyNet(TinyConfig()).save_pretrained(tmp_path / "tiny")
    config_file = tmp_path / "tiny" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "depth": 3, "heads": 2}))
    with pytest.raises(CheckpointError, match="does not know: depth, heads"):
        TinyNet.from_pretrained(tmp_path / "tiny")
    config_file.write_text(json.dumps({**config, "head": {"sizes": [6], "bias": True}}))
    with pytest.raises(CheckpointError, match="HeadConfig does not know: bias"):
        TinyNet.from_pretrained(tmp_path / "tiny")
    config_file.write_text(json.dumps({**config, "_class_name": "OtherNet"}))
    with pytest.raises(CheckpointError, match="checkpoint of OtherNet, not of TinyNet"):
        TinyNet.from_pretrained(tmp_path / "tiny")
    config_file.write_text(json.dumps({**config, "width": 5}))  # config no longer fits
    with pytest.raises(CheckpointError, match=r"inp.weight: checkpoint \(4, 8\) vs model \(4, 5\)"):
        TinyNet.from_pretrained(tmp_path / "tiny")
    for width, kind in (("8", "str"), (None, "NoneType"), (8.0, "float")):  # wrong types
        config_file.write_text(json.dumps({**config, "width": width}))
        with pytest.raises(CheckpointError, match=f"width must be int, got {kind}"):
            TinyNet.from_pretrained(tmp_path / "tiny")
    config_file.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(CheckpointError, match="config.json"):
        TinyNet.from_pretrained(tmp_path / "tiny")


# -----------------------------------------------------------------------------
# packaging: a non-editable install finds its bundled files from anywhere


def test_non_editable_install_resolves_bundled_tokenizer_and_models(tmp_path):
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".*")
    for name in ("anygen", "tokenizers"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-cache-dir", "--target", str(site), str(src)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert not (site / "tokenizers").exists(), "the wheel must not ship a 'tokenizers' package"
    code = (
        "import anygen, tokenizers\n"
        "from anygen.hub import resolve, bundled_models\n"
        "from anygen.tokenizers.text import load_text_tokenizer\n"
        "print(anygen.__file__)\n"
        "print(resolve('shapes-bpe'))\n"
        "print(len(load_text_tokenizer('shapes-bpe')))\n"
        "print(hasattr(tokenizers, 'Tokenizer'))\n"
        "print(','.join(sorted(bundled_models('model'))) or '-')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    module_file, tokenizer_dir, size, hf_tokenizers, models = run.stdout.split()
    assert Path(module_file).is_relative_to(site)
    assert Path(tokenizer_dir) == site / "anygen" / "_tokenizers" / "shapes-bpe"
    assert int(size) == card_metadata("shapes-bpe")["vocab_size"]
    assert hf_tokenizers == "True"
    # every bundled model ships too, weights and all
    here = bundled_models("model")
    assert models == (",".join(sorted(here)) or "-")
    for name, folder in here.items():
        shipped = site / "anygen" / "assets" / "models" / name
        for file in folder.rglob("*.safetensors"):
            assert (shipped / file.relative_to(folder)).is_file(), file


def test_checkout_fallback_is_never_huggingface_tokenizers(monkeypatch, tmp_path):
    """Next to an installed anygen, "tokenizers" is HuggingFace's package: not ours."""
    fake = tmp_path / "anygen" / "hub.py"
    fake.parent.mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "tokenizers").mkdir()
    monkeypatch.setattr(hub, "__file__", str(fake))
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name: None)
    assert hub._tokenizers_root() == tmp_path / "tokenizers"  # a source checkout
    (tmp_path / "tokenizers" / "__init__.py").write_text("")
    assert hub._tokenizers_root() is None


def test_downloads_show_a_bar_unless_the_user_switched_the_hubs_off(tmp_path, monkeypatch):
    """The CLI hides the libraries' loading bars through the hub's switch; a download still
    draws its bar, except where the user set that switch."""
    import huggingface_hub
    from huggingface_hub import constants
    from tqdm.auto import tqdm

    from anygen.cli import _quiet_libraries
    from anygen.hub import _download

    seen = {}

    def snapshot_download(repo_id, **kwargs):
        seen.update(kwargs)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for user_switch, bar in ((None, tqdm), ("1", None)):
        monkeypatch.delenv("ANYGEN_DOWNLOAD_BARS", raising=False)
        if user_switch is None:
            monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
        else:
            monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", user_switch)
        _quiet_libraries()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        assert _download("anygen-test/tok", "tokenizer") == tmp_path
        drawn = seen["tqdm_class"]
        assert drawn is None if bar is None else issubclass(drawn, bar)


def test_loaders_name_a_folder_without_a_readable_config(tmp_path):
    from anygen.pipelines import load_generator
    from anygen.tokenizers.visual import load_visual_codec
    from anygen.tokenizers.vq import load_image_tokenizer

    with pytest.raises(CheckpointError, match="has no config.json: not an image tokenizer"):
        load_image_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="has no config.json: not a visual codec"):
        load_visual_codec(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    for load in (load_image_tokenizer, load_visual_codec):
        with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
            load(tmp_path)
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_generator(str(tmp_path), device="cpu")
    (tmp_path / "config.json").write_bytes(b'{"_class_name": "caf\xe9"}')  # not UTF-8
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_generator(str(tmp_path), device="cpu")
    (tmp_path / "config.json").write_text('{"_class_name": "VitVQGAN"}')
    with pytest.raises(CheckpointError, match="holds a VitVQGAN, not a VisualCodec"):
        load_visual_codec(tmp_path)
    with pytest.raises(ModelNotFoundError, match="model class 'VitVQGAN' is not one this"):
        load_generator(str(tmp_path), device="cpu")
    # a diffusers folder's model index and anygen.json, each not UTF-8 or not an object
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_bytes(b'{"_class_name": "caf\xe9"}')
    with pytest.raises(CheckpointError, match="model_index.json is not valid JSON"):
        load_generator(str(pipe), device="cpu")
    (pipe / "model_index.json").write_text('["StableDiffusionPipeline"]')
    with pytest.raises(CheckpointError, match="model_index.json holds a list, not a JSON object"):
        load_generator(str(pipe), device="cpu")
    (pipe / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (pipe / "anygen.json").write_bytes(b'{"family": "caf\xe9"}')
    with pytest.raises(CheckpointError, match="anygen.json is not valid JSON"):
        load_generator(str(pipe), device="cpu")


def test_rebundling_keeps_the_hand_written_history_and_drops_generated_blocks(tmp_path):
    """A recipe's ``--bundle`` writes a new card; ``keep_history`` carries the old card's
    hand-written history block into it, once, and nothing else of the old card."""
    old = (
        "---\nscore: 0.5\n---\n# m\n\nold scores\n\n<!-- anygen:history -->\n## How it came"
        "\n\nrun A, then B.\n<!-- /anygen:history -->\n\n<!-- anygen:sampling_reselection -->"
        "\nguidance 2.0 (chosen for the old weights)\n<!-- /anygen:sampling_reselection -->\n"
    )
    (tmp_path / "README.md").write_text(old)
    new = "---\nscore: 0.7\n---\n# m\n\nnew scores\n"
    card = hub.keep_history(new, tmp_path)
    assert (
        card
        == new
        + "\n<!-- anygen:history -->\n## How it came\n\nrun A, then B.\n<!-- /anygen:history -->\n"
    )
    assert "old scores" not in card and "sampling_reselection" not in card
    # a card that has its own block gets the old text in its place, not a second block
    again = hub.keep_history(card.replace("run A, then B.", "stale"), tmp_path)
    assert again == card and again.count("<!-- anygen:history -->") == 1
    assert hub.card_block(card, "history") == "## How it came\n\nrun A, then B."
    # no card, or a card without the block (or with a begin marker only): unchanged
    assert hub.keep_history(new, tmp_path / "nothing-here") == new
    (tmp_path / "README.md").write_text("# m\n<!-- anygen:history -->\nno end marker\n")
    assert hub.keep_history(new, tmp_path) == new


@pytest.mark.parametrize(
    "name",
    [
        "shapes-dit",
        "shapes-edit",
        "shapes-emu",
        "shapes-fusion",
        "shapes-ldm",
        "shapes-parti",
        "shapes-vq",
    ],
)
def test_bundled_cards_mark_their_history_for_the_next_bundle(name):
    """What was written by hand about a bundled model is one history block, which its
    recipe carries into the card of the next bundle (generated blocks stay outside it)."""
    card = (bundled_models()[name] / "README.md").read_text()
    history = hub.card_block(card, "history")
    assert history is not None and history.startswith("## ")
    assert card.count("<!-- anygen:history -->") == card.count("<!-- /anygen:history -->") == 1
    assert "<!-- anygen:" not in history  # no generated block would be carried with it
