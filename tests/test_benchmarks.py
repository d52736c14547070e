"""The benchmark suite (benchmarks/) on tiny configs, its FLOP and bandwidth arithmetic
against hand-computed values, and the automatic attention backend (xformers on CUDA where
usable, else sdpa)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from anygen import attention as attn
from anygen.attention import (
    attention,
    attention_backend,
    auto_backend,
    resolve_backend,
    set_diffusers_attention,
    transformers_attn_implementation,
    xformers_usable,
)
from anygen.errors import UserInputError
from anygen.models.fusion import FUSION_PRESETS, FusionTransformer
from anygen.models.parti import PARTI_PRESETS, PartiTransformer
from benchmarks import fusion_decoding, parti_decoding, train_step
from benchmarks.__main__ import main as bench_main
from benchmarks.common import (
    Recorder,
    Settings,
    bandwidth_bound_s,
    format_table,
    matmul_params,
    mfu,
    training_flops_per_token,
)
from benchmarks.suite import BENCHMARKS, _runs_recompute

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


# -----------------------------------------------------------------------------
# the automatic attention backend


@pytest.fixture
def fresh_probe(monkeypatch):
    """An empty per-device cache and a probe that records its calls and answers ``ok``."""
    calls = []
    answer = {"ok": True}

    def probe(device):
        calls.append(str(device))
        return answer["ok"]

    monkeypatch.setattr(attn, "_xformers_usable", {})
    monkeypatch.setattr(attn, "_xformers_probe", probe)
    return calls, answer


def test_auto_picks_xformers_only_on_cuda_where_usable(fresh_probe):
    calls, answer = fresh_probe
    assert auto_backend("cpu") == "sdpa"  # never probed off CUDA
    assert calls == []
    assert auto_backend("cuda:0") == "xformers"
    assert auto_backend(torch.device("cuda", 0)) == "xformers"
    assert calls == ["cuda:0"]  # probed once per device, then remembered
    answer["ok"] = False
    assert auto_backend("cuda:1") == "sdpa"
    assert resolve_backend("auto", "cuda:1") == "sdpa"
    assert resolve_backend("auto", "cuda:0") == "xformers"
    assert resolve_backend("math", "cuda:0") == "math"  # an explicit choice stays
    assert calls == ["cuda:0", "cuda:1"]


class _FakeXops:
    def __init__(self, error=None):
        self.error = error
        self.shapes = []

    def memory_efficient_attention(self, q, k, v):
        self.shapes.append(tuple(q.shape))
        if self.error is not None:
            raise self.error
        return q


def test_xformers_probe_fails_closed(monkeypatch):
    """Installed without kernels for this torch/CUDA (it imports, then raises at the
    first call) or not installed: not usable. Kernels that run: usable."""

    def missing():
        raise UserInputError("no xformers")

    monkeypatch.setattr(attn, "_xformers_ops", missing)
    assert attn._xformers_probe(CPU) is False
    broken = _FakeXops(NotImplementedError("No operator found for memory_efficient_attention"))
    monkeypatch.setattr(attn, "_xformers_ops", lambda: broken)
    assert attn._xformers_probe(CPU) is False
    assert broken.shapes == [(1, 1, 1, 64)]
    monkeypatch.setattr(attn, "_xformers_ops", lambda: _FakeXops())
    assert attn._xformers_probe(CPU) is True


def test_auto_is_the_default_and_falls_back_to_sdpa_here(monkeypatch):
    calls = []
    real = attn.BACKENDS["sdpa"]
    monkeypatch.setitem(attn.BACKENDS, "sdpa", lambda *a: calls.append("sdpa") or real(*a))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    want = real(q, k, v, None, True, 0.0, None)
    assert torch.equal(attention(q, k, v, is_causal=True), want)
    with attention_backend("auto"):
        assert torch.equal(attention(q, k, v, is_causal=True), want)
    assert torch.equal(attention(q, k, v, is_causal=True, backend="auto"), want)
    assert calls == ["sdpa"] * 3
    assert attn.DEFAULT_BACKEND == "auto"
    if not torch.cuda.is_available():
        assert not xformers_usable("cpu")
        assert transformers_attn_implementation("auto") == "sdpa"
    with pytest.raises(UserInputError, match="choose one of auto, sdpa, math, xformers"):
        attention(q, k, v, backend="flash")


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()


def test_pipelines_switch_only_diffusers_models_and_only_to_xformers(monkeypatch, tiny_unet):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from transformers import CLIPTextConfig, CLIPTextModel

    from anygen.pipelines.runtime import auto_attention

    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=50,
        )
    )
    modules = {"unet": tiny_unet, "text_encoder": text, "tokenizer": object()}
    # where auto means sdpa nothing is touched: a model set to math stays so
    set_diffusers_attention(tiny_unet, "math")
    assert auto_attention(modules, "cpu") == "sdpa"
    assert {type(p) for p in tiny_unet.attn_processors.values()} == {AttnProcessor}
    set_diffusers_attention(tiny_unet, "auto")  # explicit auto on a CPU model: sdpa
    assert {type(p) for p in tiny_unet.attn_processors.values()} == {AttnProcessor2_0}

    # where auto means xformers: the diffusers models with classic processors only
    switched = []
    monkeypatch.setattr(attn, "auto_backend", lambda device: "xformers")
    monkeypatch.setattr(
        attn,
        "set_diffusers_attention",
        lambda model, backend, device: switched.append((model, backend, device)),
    )
    assert auto_attention(modules, "cuda:0") == "xformers"
    assert switched == [(tiny_unet, "xformers", "cuda:0")]  # by the device it will run on
    assert text.config._attn_implementation == "sdpa"

    class Custom(AttnProcessor2_0):  # e.g. a LoRA or IP-Adapter processor
        pass

    assert attn.has_classic_attention(tiny_unet)
    name = next(iter(tiny_unet.attn_processors))
    tiny_unet.set_attn_processor({**tiny_unet.attn_processors, name: Custom()})
    try:
        assert not attn.has_classic_attention(tiny_unet)
        switched.clear()
        auto_attention(modules, "cuda:0")
        assert switched == []  # left alone, not half switched
    finally:
        tiny_unet.set_attn_processor(AttnProcessor2_0())


def test_auto_keeps_processors_it_cannot_map(monkeypatch, tiny_unet, caplog):
    """xformers chosen, but the real switch refuses (here: xformers missing, or a model on
    the CPU): warn, and keep what the model has."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from anygen.pipelines.runtime import auto_attention

    monkeypatch.setattr(attn, "auto_backend", lambda device: "xformers")
    set_diffusers_attention(tiny_unet, "sdpa")
    with caplog.at_level("WARNING"):
        auto_attention({"unet": tiny_unet}, "cpu")
    assert "keeps its attention processors" in caplog.text
    assert {type(p) for p in tiny_unet.attn_processors.values()} == {AttnProcessor2_0}


@pytest.mark.skipif(
    not (torch.cuda.is_available() and xformers_usable("cuda")),
    reason="needs a CUDA device and an xformers build whose kernels run with this torch "
    "(python -m xformers.info); benchmarks/gpu_plan.sh runs it on the GPU machine",
)
def test_xformers_and_sdpa_give_the_same_images():
    from diffusers.models.attention_processor import XFormersAttnProcessor

    from anygen.models.ldm import LDM_PRESETS, build_components
    from anygen.pipelines import Options
    from anygen.pipelines.text_to_image import LatentDiffusion
    from anygen.tokenizers.text import load_text_tokenizer

    torch.manual_seed(0)
    gen = LatentDiffusion(
        build_components(LDM_PRESETS["tiny"], load_text_tokenizer("shapes-bpe")),
        device="cuda",
        dtype=torch.float32,
    )
    # chosen automatically at construction
    assert {type(p) for p in gen.components.denoiser.attn_processors.values()} == {
        XFormersAttnProcessor
    }
    opts = Options(steps=4, guidance_scale=4.0, progress=False)
    prompts = ["a red circle", "two blue squares"]
    images = {}
    for backend in ("xformers", "sdpa"):
        set_diffusers_attention(gen.components.denoiser, backend)
        set_diffusers_attention(gen.components.vae, backend)
        out = gen.generate_batch(prompts, [0, 1], opts).images
        images[backend] = np.stack([np.asarray(im, np.int16) for im in out])
    assert np.abs(images["xformers"] - images["sdpa"]).max() <= 2


# -----------------------------------------------------------------------------
# arithmetic, against hand-computed values


def test_flops_mfu_and_bound_arithmetic():
    # 6 N + 12 L H Q T: 6 * 1000 + 12 * 2 * 4 * 8 * 16 = 6000 + 12288
    assert training_flops_per_token(1000, 2, 4, 8, 16) == 18288
    # 18288 FLOP/token * 32 tokens in 1 ms on a 1 GFLOP/s peak
    assert mfu(18288 * 32, 1e-3, 1e9) == pytest.approx(0.585216)
    assert mfu(1.0, 1.0, None) is None
    # 100 steps reading 2 GB each at 4 TB/s
    assert bandwidth_bound_s(2e9, 100, 4e12) == pytest.approx(0.05)


def test_fusion_counts_match_a_hand_count():
    torch.manual_seed(0)
    model = FusionTransformer(FUSION_PRESETS["tiny"])
    # vocab 309 + 32 = 341, width 32, 2 layers, 4 heads of 8, 2 KV heads, MLP 64, untied:
    # embedding and head 341 * 32 = 10912 each; a layer: q 1024 + k 512 + v 512 + o 1024
    # + MLP 3 * 32 * 64 + 2 norms of 32 = 9280; final norm 32
    assert sum(p.numel() for p in model.parameters()) == 2 * 10912 + 2 * 9280 + 32
    n = matmul_params(model, model.backbone.get_input_embeddings())
    assert n == 10912 + 2 * 9280 + 32  # the indexed input table is not a matmul
    # fp32, 2 rows, 10 positions: weights but the input table, and K, V of 2 layers x
    # 2 KV heads x 8 wide per position and row
    assert fusion_decoding.bytes_per_step(model, 2, 10) == 29504 * 4 + 2 * 2 * 2 * 8 * 10 * 2 * 4
    # a diffusion head's weights are read once per DDIM step
    continuous = FusionTransformer(FUSION_PRESETS["tiny-continuous"])
    plain = fusion_decoding.bytes_per_step(continuous, 2, 10)
    continuous.add_diffusion_head(scale=1.0)
    head = sum(p.numel() for p in continuous.diffusion.parameters())
    steps = continuous.config.diffusion_steps
    assert fusion_decoding.bytes_per_step(continuous, 2, 10) == plain + steps * head * 4
    # the tiny training batch: 4 rows of 4 documents of 1 + 8 + (16 + 2) + 1 tokens
    batch = train_step.make_batch(model.config, *train_step.TINY[1:])
    assert tuple(batch.ids.shape) == (4, 112) and bool(batch.mask.all())
    n_mm, flops = train_step.step_flops(model, batch)
    assert flops == (6 * 29504 + 12 * 2 * 4 * 8 * 112) * 448


def test_parti_decode_bytes_match_a_hand_count():
    torch.manual_seed(0)
    model = PartiTransformer(PARTI_PRESETS["tiny"])
    # GPT-2 decoder, width 32, 2 layers with cross-attention, MLP 64, 33 tokens, 16
    # positions, tied head. A layer: 3 norms 3 * 64, self c_attn 32 * 96 + 96, c_proj
    # 1056, cross q 1056, cross kv 32 * 64 + 64, cross proj 1056, fc 32 * 64 + 64, proj
    # 64 * 32 + 32 = 12832
    layer = 3 * 64 + 3168 + 1056 + 1056 + 2112 + 1056 + 2112 + 2080
    weights = 33 * 32 + 2 * layer + 64  # wte (read whole by the tied head), layers, ln_f
    assert sum(p.numel() for p in model.decoder.parameters()) == weights + 16 * 32  # + wpe
    # 2 rows, self context 8.5, 5 text states: K and V of 2 layers x 32 wide, fp32
    per_position = 2 * 2 * 32 * 4
    want = weights * 4 + per_position * 2 * (8.5 + 5)
    assert parti_decoding.decode_bytes_per_step(model, 2, 8.5, 5) == want


def test_table_lists_every_column():
    table = format_table([{"a": 1, "b": 0.5}, {"a": 2, "c": None, "d": True}])
    header, rule, first, second = table.splitlines()
    assert header.split() == ["a", "b", "c", "d"]
    assert first.split() == ["1", "0.5", "-", "-"]
    assert second.split() == ["2", "-", "-", "yes"]


def test_recompute_runs_at_real_size_only_at_batch_1_on_a_gpu():
    gpu = Settings(size="real", device=torch.device("cuda"))
    assert _runs_recompute(gpu, 1) and not _runs_recompute(gpu, 16)
    assert not _runs_recompute(Settings(size="real", device=CPU), 1)
    assert _runs_recompute(Settings(size="tiny", device=CPU), 16)


# -----------------------------------------------------------------------------
# the tiny suite, once, with one timed repeat


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.json"
    rec = Recorder({"size": "tiny"}, out, echo=False)
    settings = Settings(size="tiny", device=CPU, repeats=1)
    for fn in BENCHMARKS.values():
        fn(settings, rec)
    return rec, out


def test_tiny_ldm_equals_diffusers_under_every_backend(tiny_run):
    rec, _ = tiny_run
    rows = [r for r in rec.of("ldm") if r["variant"] == "eager"]
    assert {(r["attention"], r["batch"]) for r in rows} == {
        (b, n) for b in ("sdpa", "math") for n in (1, 8)
    }
    for r in rows:
        assert r["max_pixel_diff"] == 0, r  # anygen's loop is diffusers' step for step
        assert r["max_pixel_diff_vs_sdpa"] <= 1, r
        assert r["anygen_s"] > 0 and r["diffusers_s"] > 0
        assert r["auto"] == (r["attention"] == "sdpa")  # what auto picks on a CPU
    summary = [r for r in rec.of("ldm") if r["variant"] == "summary"]
    assert [r["batch"] for r in summary] == [1, 8]
    for r in summary:
        assert r["anygen_auto_backend"] == "sdpa"
        assert r["ratio"] == pytest.approx(r["anygen_s"] / r["diffusers_s"], rel=1e-2)
    assert any(s["what"] == "attention xformers" for s in rec.skipped)


def test_tiny_decoding_outputs_identical_and_bounded(tiny_run):
    rec, _ = tiny_run
    parti = rec.of("parti")
    assert [r["batch"] for r in parti] == [1, 16]
    for r in parti:
        assert r["kv_tokens_identical"] and r["cfg_tokens_identical"], r
        assert 0 < r["fraction_of_bound"] <= 1
        assert r["bandwidth_bound_s"] < r["kv_cache_s"]
    fusion = rec.of("fusion")
    ours = [r for r in fusion if r["loop"] == "anygen decode"]
    assert {(r["preset"], r["batch"]) for r in ours} == {
        (p, b) for p in ("tiny", "tiny-continuous") for b in (1, 16)
    }
    for r in ours:
        assert r["kv_identical"] and r["deterministic"], r
        assert 0 < r["fraction_of_bound"] <= 1
        # rates are rounded to 1 decimal: on a slow or busy machine that is more than 1%
        assert r["positions_per_s"] == pytest.approx(
            r["batch"] * (r["image_positions"] + 1) / r["kv_cache_s"], rel=1e-2, abs=0.05
        )
    generate = [r for r in fusion if r["loop"].startswith("transformers generate")]
    assert [(r["preset"], r["batch"]) for r in generate] == [("tiny", 1), ("tiny", 16)]
    assert all(r["deterministic"] for r in generate)


def test_tiny_train_reports_flops_not_mfu_on_cpu(tiny_run):
    rec, _ = tiny_run
    (row,) = rec.of("train")
    assert row["mfu"] is None and row["peak_tflops"] is None
    assert row["flops_per_step"] == (6 * 29504 + 12 * 2 * 4 * 8 * 112) * 448
    assert row["achieved_tflops"] == pytest.approx(
        row["flops_per_step"] / row["step_s"] / 1e12, rel=1e-2
    )
    assert row["finite"] and row["tokens_per_step"] == 448


def test_tiny_decoders_agree_across_backends(tiny_run):
    rec, _ = tiny_run
    rows = rec.of("decoders")
    assert {(r["decoder"], r["attention"], r["batch"]) for r in rows} == {
        (d, b, n) for d in ("vae", "vq", "visual") for b in ("sdpa", "math") for n in (1, 8)
    }
    for r in rows:
        assert r["max_abs_diff_vs_sdpa"] <= 1e-4, r
        # rounded to 2 decimals, more than 1% below 0.5 images/s
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["s"], rel=1e-2, abs=0.005)


def test_tiny_json_holds_every_row(tiny_run):
    rec, out = tiny_run
    data = json.loads(out.read_text())
    assert data["rows"] == rec.rows and data["skipped"] == rec.skipped
    assert {r["benchmark"] for r in data["rows"]} == set(BENCHMARKS)


def test_compiled_variants_are_skipped_on_cpu():
    rec = Recorder({}, echo=False)
    settings = Settings(size="tiny", device=CPU, repeats=1, variant="compiled")
    for name in ("fusion", "train"):
        BENCHMARKS[name](settings, rec)
    assert rec.rows == []
    assert {s["benchmark"] for s in rec.skipped} == {"fusion", "train"}
    assert all("GPU-only" in s["reason"] for s in rec.skipped)


def test_cli_runs_and_writes_json(tmp_path, capsys):
    assert bench_main(["list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in BENCHMARKS)
    out = tmp_path / "train.json"
    assert bench_main(["run", "train", "--size", "tiny", "--repeats", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "## train" in printed and "## goals" in printed
    data = json.loads(out.read_text())
    meta = data["meta"]
    assert {"date", "device_name", "torch", "diffusers", "transformers", "attention_auto"} <= set(
        meta
    )
    assert meta["torch"] == torch.__version__ and meta["attention_auto"] == auto_backend("cpu")
    assert [r["benchmark"] for r in data["rows"]] == ["train"]
    assert meta["goals"][0]["goal"].startswith("train tiny eager")
    with pytest.raises(SystemExit) as exit_:
        bench_main(["run", "nope"])
    assert exit_.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_scripts_still_run_as_files(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "parti_decoding.py"),
            "--preset",
            "tiny",
            "--codes",
            "16",
            "--batch",
            "2",
            "--repeats",
            "1",
        ],
        cwd=tmp_path,  # not the repository: the script finds its package itself
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    row = json.loads(run.stdout.strip().splitlines()[-1])
    assert row["kv_tokens_identical"] and row["cfg_tokens_identical"]


def test_layout_probe_tells_a_caption_led_layout_from_a_noise_led_one():
    from anygen.data.render import render_image
    from anygen.data.world import CELLS_BY_POSITION, Obj, Scene
    from benchmarks.layout_probe import CELLS, layout_table

    def circle(cell: tuple[int, int]):
        return render_image(Scene((Obj("circle", "red", "large", *cell),)))

    def obeys(prompts, seeds):  # every object where its caption says
        return [circle(CELLS_BY_POSITION[p.split(" in the ")[1]]) for p in prompts]

    def noise_led(prompts, seeds):  # the seed alone picks the cell
        return [circle((s % 3, (s // 3) % 3)) for s in seeds]

    good = layout_table(obeys, [500, 501])
    assert (good["hits"], good["images"], good["distinct_cells_per_seed"]) == (18, 18, {9: 2})
    assert good["rows"][500] == CELLS
    bad = layout_table(noise_led, [500, 501])
    assert (bad["hits"], bad["distinct_cells_per_seed"]) == (2, {1: 2})  # one hit per seed
    assert bad["rows"][501] == [CELLS[501 % 9]] * 9
