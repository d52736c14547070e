"""The training loop: exact resume, crash-safe checkpoints, accumulation, EMA, launch, recipes.

Models and data come from tests/_train_script.py, which also runs as a subprocess (a run
killed after a checkpoint, and a 2-process `accelerate launch` on gloo).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_script import make_dataset, make_model, mse_loss
from accelerate.state import AcceleratorState, GradientState
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from anygen.errors import AnygenError, CheckpointError, UserInputError
from anygen.training import (
    TrainConfig,
    device_description,
    latest_checkpoint,
    list_checkpoints,
    load_recipe,
    run_recipe,
    train,
)
from anygen.training.checkpoint import COMPLETE_MARKER, read_marker

TESTS_DIR = Path(__file__).parent
REPO_ROOT = TESTS_DIR.parent
TRAIN_SCRIPT = TESTS_DIR / "_train_script.py"


def _reset_accelerate() -> None:
    # accelerate keeps one shared state per process (state.py: _reset_state in 1.15).
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    _reset_accelerate()
    yield
    _reset_accelerate()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls: threads only add contention on a shared 2-core machine, and the same
    # thread count as the subprocesses (OMP_NUM_THREADS=1) keeps float results identical.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _subprocess_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _load_pickle(path: Path):
    return torch.load(path, weights_only=False)


def _assert_same_tree(a, b, where: str = "") -> None:
    """Nested dicts/lists/tensors equal exactly (tensors by torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"tensors differ at {where}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"keys differ at {where}"
        for key in a:
            _assert_same_tree(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"lengths differ at {where}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        pass  # both NaN
    else:
        assert a == b, f"{a!r} != {b!r} at {where}"


# 40 samples / batch 4 = 10 micro-batches per epoch; 8 steps x 2 = 16 micro-batches, so the
# run crosses an epoch, and the checkpoint at step 4 sits mid-epoch (8 micro-batches in).
RESUME_CONFIG = dict(
    max_steps=8,
    batch_size=4,
    gradient_accumulation_steps=2,
    learning_rate=0.01,
    lr_schedule="cosine",
    warmup_steps=2,
    ema_decay=0.9,
    checkpoint_every=4,
    keep_last_checkpoints=None,
    log_every=2,
    seed=3,
)


def test_killed_and_resumed_run_equals_straight_run(tmp_path):
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight = train(
        make_model(),
        mse_loss,
        make_dataset(),
        TrainConfig(output_dir=straight_dir, **RESUME_CONFIG),
    )

    config_json = json.dumps({"output_dir": str(resumed_dir), **RESUME_CONFIG})
    killed = subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), "--config", config_json, "--kill-at-step", "4"],
        env=_subprocess_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == 1, killed.stderr[-3000:]
    assert [step for step, _ in list_checkpoints(resumed_dir)] == [4]

    _reset_accelerate()
    resumed = train(
        make_model(),
        mse_loss,
        make_dataset(),
        TrainConfig(output_dir=resumed_dir, resume="latest", **RESUME_CONFIG),
    )
    assert resumed.resumed_from == resumed_dir / "checkpoints" / "step-00000004"
    assert resumed.step == straight.step == 8
    assert (resumed.start_step, straight.start_step) == (4, 0)

    # Returned models (EMA weights) are identical.
    for (name, p), q in zip(
        straight.model.named_parameters(), resumed.model.parameters(), strict=True
    ):
        assert torch.equal(p, q), name
    # Raw weights, optimizer, LR scheduler, EMA and RNG states of the final checkpoints too.
    final_a = straight_dir / "checkpoints" / "step-00000008"
    final_b = resumed_dir / "checkpoints" / "step-00000008"
    _assert_same_tree(
        load_file(final_a / "model.safetensors"), load_file(final_b / "model.safetensors")
    )
    optimizer_a = _load_pickle(final_a / "optimizer.bin")
    assert optimizer_a["state"], "the optimizer state is empty: nothing was compared"
    _assert_same_tree(optimizer_a, _load_pickle(final_b / "optimizer.bin"), "optimizer")
    scheduler_a = _load_pickle(final_a / "scheduler.bin")
    assert scheduler_a["last_epoch"] == 8
    _assert_same_tree(scheduler_a, _load_pickle(final_b / "scheduler.bin"), "scheduler")
    _assert_same_tree(
        load_file(final_a / "ema.safetensors"), load_file(final_b / "ema.safetensors")
    )
    assert not list(final_a.glob("custom_checkpoint_*")), "EMA must not be pickled"
    with safe_open(str(final_b / "ema.safetensors"), framework="pt") as f:
        assert f.metadata()["optimization_step"] == "8"
    rng_a = _load_pickle(final_a / "random_states_0.pkl")
    rng_b = _load_pickle(final_b / "random_states_0.pkl")
    assert torch.equal(rng_a["torch_manual_seed"], rng_b["torch_manual_seed"])

    # The metrics log holds each step once, with the same losses as the straight run.
    rows_a, rows_b = _metrics(straight_dir), _metrics(resumed_dir)
    assert [r["step"] for r in rows_b] == [2, 4, 6, 8]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert {"lr", "mae", "samples_per_s", "time", "grad_norm"} <= rows_b[-1].keys()


def _complete_run(output_dir: Path, max_steps: int, **overrides) -> None:
    config = TrainConfig(
        output_dir=output_dir,
        max_steps=max_steps,
        batch_size=4,
        checkpoint_every=2,
        keep_last_checkpoints=None,
        **overrides,
    )
    train(make_model(), mse_loss, make_dataset(), config)
    _reset_accelerate()


def _resume_keeping_two(output_dir: Path, max_steps: int):
    """Resume output_dir's latest checkpoint to max_steps, checkpointing every 2 steps and
    keeping the last 2."""
    config = TrainConfig(
        output_dir=output_dir,
        max_steps=max_steps,
        batch_size=4,
        checkpoint_every=2,
        keep_last_checkpoints=2,
        resume="latest",
    )
    return train(make_model(), mse_loss, make_dataset(), config)


def test_interrupted_checkpoints_are_ignored_and_cleaned(tmp_path):
    out = tmp_path / "run"
    _complete_run(out, max_steps=4)
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004"]

    # A write killed before the rename, and a step dir that lacks its completion marker.
    partial = root / ".tmp-step-00000006"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")
    unmarked = root / "step-00000008"
    shutil.copytree(root / "step-00000004", unmarked)
    (unmarked / COMPLETE_MARKER).unlink()

    assert latest_checkpoint(out) == root / "step-00000004"
    with pytest.raises(CheckpointError, match="incomplete"):
        read_marker(unmarked)
    with pytest.raises(CheckpointError, match="incomplete"):
        train(
            make_model(),
            mse_loss,
            make_dataset(),
            TrainConfig(output_dir=out, resume=str(unmarked)),
        )
    _reset_accelerate()

    result = _resume_keeping_two(out, max_steps=6)
    assert result.resumed_from == root / "step-00000004"
    assert result.step == 6
    assert not partial.exists() and not unmarked.exists()
    # keep_last_checkpoints=2 pruned step 2.
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004", "step-00000006"]
    assert read_marker(root / "step-00000006")["step"] == 6


def test_resume_with_another_learning_rate_uses_it(tmp_path, caplog):
    """A run resumed with a new --lr continues its schedule under the new peak, and says so
    (the checkpoint's optimizer state would otherwise keep the old one)."""
    out = tmp_path / "run"
    base = dict(lr_schedule="constant", warmup_steps=0, log_every=1)
    _complete_run(out, max_steps=2, learning_rate=0.01, **base)
    config = TrainConfig(
        output_dir=out, max_steps=4, batch_size=4, resume="latest", learning_rate=0.002, **base
    )
    train(make_model(), mse_loss, make_dataset(), config)
    assert [round(r["lr"], 6) for r in _metrics(out)] == [0.01, 0.01, 0.002, 0.002]
    assert "other optimizer settings" in caplog.text and "0.002" in caplog.text


def test_resume_may_prune_the_checkpoint_it_started_from(tmp_path):
    # A long resume with keep_last_checkpoints deletes its own starting checkpoint, so
    # recipes count the steps this invocation trained from start_step, not by reading
    # resumed_from (the instruct-edit recipe did, and failed after 1,600 steps of training).
    out = tmp_path / "run"
    _complete_run(out, max_steps=2)
    result = _resume_keeping_two(out, max_steps=6)
    assert result.resumed_from == out / "checkpoints" / "step-00000002"
    assert not result.resumed_from.exists()
    assert (result.start_step, result.step) == (2, 6)


def test_resume_from_an_earlier_checkpoint_refuses_while_later_ones_remain(tmp_path):
    """Later checkpoints of the abandoned run would pass for the resumed run's own (latest
    and pruning prefer them): named, and training again from there is the user's call."""
    out = tmp_path / "run"
    _complete_run(out, max_steps=6)
    early = out / "checkpoints" / "step-00000002"
    config = dict(output_dir=out, max_steps=6, batch_size=4, checkpoint_every=2)
    with pytest.raises(UserInputError, match="after step-00000002 .*step-00000004, step-00000006"):
        train(make_model(), mse_loss, make_dataset(), TrainConfig(resume=str(early), **config))
    for later in ("step-00000004", "step-00000006"):
        shutil.rmtree(out / "checkpoints" / later)
    result = train(make_model(), mse_loss, make_dataset(), TrainConfig(resume=str(early), **config))
    assert (result.start_step, result.step) == (2, 6)


def test_fresh_start_refuses_an_output_dir_with_checkpoints(tmp_path):
    out = tmp_path / "run"
    _complete_run(out, max_steps=2)
    with pytest.raises(UserInputError, match="resume='latest'"):
        train(make_model(), mse_loss, make_dataset(), TrainConfig(output_dir=out, batch_size=4))


def test_resume_at_max_steps_trains_nothing(tmp_path):
    out = tmp_path / "run"
    _complete_run(out, max_steps=2)
    model = make_model()
    config = TrainConfig(output_dir=out, max_steps=2, batch_size=4, resume="latest")
    result = train(model, mse_loss, make_dataset(), config)
    assert result.step == result.start_step == 2
    # it reports the loss the run logged last, as the run that trained it did
    last_row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last_row["step"] == 2
    assert last_row.pop("device") == device_description()  # numbers only in the result
    assert result.metrics == last_row and result.loss == last_row["loss"]
    saved = load_file(out / "checkpoints" / "step-00000002" / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def _launch_two_cpu_processes(tmp_path: Path, config: dict, reports: Path) -> str:
    """Run _train_script.py on 2 CPU processes (DDP on gloo); returns its stderr."""
    reports.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _subprocess_env(tmp_path)
    # `--cpu --num_processes 2` alone starts one process in accelerate 1.15 (several CPU
    # processes need MPI there); torchrun's launcher with ACCELERATE_USE_CPU gives gloo.
    env["ACCELERATE_USE_CPU"] = "1"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port),
        str(TRAIN_SCRIPT), "--config", json.dumps(config), "--report-dir", str(reports),
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stderr


def test_accelerate_launch_two_cpu_processes(tmp_path):
    out = tmp_path / "run"
    config = {
        "output_dir": str(out),
        "max_steps": 30,
        "batch_size": 4,
        "learning_rate": 0.03,
        "checkpoint_every": 15,
        "log_every": 5,
    }
    stderr = _launch_two_cpu_processes(tmp_path, config, tmp_path / "reports")

    ranks = [json.loads((tmp_path / "reports" / f"rank-{i}.json").read_text()) for i in range(2)]
    for rank in ranks:
        assert rank["num_processes"] == 2
        assert rank["steps"] == list(range(1, 31))
    assert ranks[0]["params"] == ranks[1]["params"]  # DDP kept the replicas equal

    losses = [row["loss"] for row in _metrics(out)]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0], losses
    assert [step for step, _ in list_checkpoints(out)] == [15, 30]
    for step in (15, 30):
        path = out / "checkpoints" / f"step-{step:08d}"
        assert (path / "random_states_0.pkl").is_file() and (path / "random_states_1.pkl").is_file()
        assert read_marker(path)["num_processes"] == 2
        assert stderr.count(f"saved checkpoint {path}") == 1
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]

    # Both ranks resume from the same checkpoint and go on.
    stderr = _launch_two_cpu_processes(
        tmp_path, {**config, "max_steps": 40, "resume": "latest"}, tmp_path / "reports-resumed"
    )
    for i in range(2):
        rank = json.loads((tmp_path / "reports-resumed" / f"rank-{i}.json").read_text())
        assert rank["steps"] == list(range(31, 41))
    assert [row["step"] for row in _metrics(out)] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [step for step, _ in list_checkpoints(out)] == [15, 30, 40]


def test_fp16_on_cpu_is_refused(tmp_path):
    config = TrainConfig(output_dir=tmp_path / "run", batch_size=4, mixed_precision="fp16")
    with pytest.raises(UserInputError, match="fp16.*GPU"):
        train(make_model(), mse_loss, make_dataset(), config)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    def run(batch_size: int, accumulation: int) -> nn.Module:
        _reset_accelerate()
        model = make_model(dropout=0.0)
        config = TrainConfig(
            output_dir=tmp_path / f"b{batch_size}x{accumulation}",
            max_steps=3,
            batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_grad_norm=None,
        )
        # SGD: unlike Adam, its update scales with the gradient, so a wrong loss
        # scaling under accumulation shows.
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        return train(model, mse_loss, make_dataset(), config, optimizer=optimizer).model

    accumulated, big_batch = run(batch_size=4, accumulation=2), run(batch_size=8, accumulation=1)
    untrained = make_model(dropout=0.0)
    for p, q, p0 in zip(
        accumulated.parameters(), big_batch.parameters(), untrained.parameters(), strict=True
    ):
        assert not torch.allclose(p, p0)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


class _Net(nn.Module):
    # dynamo skips torch's own modules' frames, so a bare nn.Sequential would never compile
    def __init__(self) -> None:
        super().__init__()
        self.net = make_model(dropout=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_compiled_training_equals_eager_and_checkpoints_the_same_names(tmp_path, caplog):
    def run(compiled: bool):
        _reset_accelerate()
        config = TrainConfig(
            output_dir=tmp_path / f"compile-{compiled}", max_steps=3, batch_size=8, compile=compiled
        )
        return train(_Net(), mse_loss, make_dataset(), config)

    torch._dynamo.reset()
    eager, compiled = run(False), run(True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    for p, q in zip(eager.model.parameters(), compiled.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    names = [set(load_file(r.checkpoint / "model.safetensors")) for r in (eager, compiled)]
    assert names[0] == names[1] and not any("_orig_mod" in n for n in names[1])
    assert compiled.model._compiled_call_impl is None  # the returned model runs eagerly
    _reset_accelerate()  # an eager run resumes the compiled one's checkpoint
    config = TrainConfig(
        output_dir=tmp_path / "compile-True", max_steps=5, batch_size=8, resume="latest"
    )
    resumed = train(_Net(), mse_loss, make_dataset(), config)
    assert (resumed.start_step, resumed.step) == (3, 5)
    assert "compiles nothing" not in caplog.text
    _reset_accelerate()  # a model of torch's own modules alone would silently stay eager
    config = TrainConfig(output_dir=tmp_path / "sequential", max_steps=1, compile=True)
    train(make_model(dropout=0.0), mse_loss, make_dataset(), config)
    assert "compiles nothing here: Sequential is built only of torch's own" in caplog.text


def test_ema_follows_the_decay_formula(tmp_path):
    decay, steps = 0.5, 12
    raw_history: list[list[torch.Tensor]] = []

    def record(info) -> None:
        raw_history.append([p.detach().clone() for p in info.model.parameters()])

    config = TrainConfig(
        output_dir=tmp_path / "run",
        max_steps=steps,
        batch_size=4,
        learning_rate=0.02,
        ema_decay=decay,
    )
    model = make_model(dropout=0.0)
    initial = [p.detach().clone() for p in model.parameters()]
    result = train(model, mse_loss, make_dataset(), config, callbacks=[record])

    # diffusers' EMAModel: at optimizer step t the decay is min(decay, (1 + s) / (10 + s))
    # with s = t - 1, and 0 at t = 1 (the average starts at the first updated weights).
    expected = initial
    for t, raw in enumerate(raw_history, start=1):
        s = t - 1
        d = 0.0 if s == 0 else min(decay, (1 + s) / (10 + s))
        expected = [d * e + (1 - d) * p for e, p in zip(expected, raw, strict=True)]
    assert result.ema is not None and result.ema.optimization_step == steps
    for ema_p, expected_p, raw_p in zip(
        result.model.parameters(), expected, raw_history[-1], strict=True
    ):
        torch.testing.assert_close(ema_p, expected_p, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(ema_p, raw_p, atol=1e-4)


def test_config_is_checked():
    with pytest.raises(UserInputError, match="lr_schedule"):
        TrainConfig(output_dir="x", lr_schedule="cosine_annealing")
    with pytest.raises(UserInputError, match="mixed_precision"):
        TrainConfig(output_dir="x", mixed_precision="fp8")
    with pytest.raises(UserInputError, match="max_steps"):
        TrainConfig(output_dir="x", max_steps=0)
    with pytest.raises(UserInputError, match="ema_decay"):
        TrainConfig(output_dir="x", ema_decay=1.0)


def test_bad_loss_outputs_and_datasets_are_refused(tmp_path):
    config = TrainConfig(output_dir=tmp_path / "run", batch_size=4, max_steps=1)
    with pytest.raises(UserInputError, match="'loss'"):
        train(make_model(), lambda m, b: {"mse": mse_loss(m, b)["loss"]}, make_dataset(), config)
    _reset_accelerate()
    with pytest.raises(UserInputError, match="scalar"):
        train(make_model(), lambda m, b: m(b[0]), make_dataset(), config)
    _reset_accelerate()
    with pytest.raises(UserInputError, match="fewer than batch_size"):
        train(make_model(), mse_loss, make_dataset(num_samples=3), config)


def test_load_recipe_errors(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        load_recipe(tmp_path / "missing.py")
    no_main = tmp_path / "no_main.py"
    no_main.write_text("X = 1\n")
    with pytest.raises(UserInputError, match="no main"):
        load_recipe(no_main)
    not_python = tmp_path / "recipe.txt"
    not_python.write_text("")
    with pytest.raises(UserInputError, match=r"\.py"):
        load_recipe(not_python)


def test_run_recipe_destroys_the_process_group_when_the_recipe_ends(tmp_path):
    # A process group left to interpreter teardown can abort a finished gloo run (SIGABRT).
    import torch.distributed as dist

    recipe = tmp_path / "needs_group.py"
    recipe.write_text(
        "import torch, torch.distributed as dist\n"
        "def main(argv):\n"
        "    t = torch.ones(2)\n"
        "    dist.all_reduce(t)\n"
        "    assert t.tolist() == [1.0, 1.0]\n"
        "    if argv == ['fail']:\n"
        "        raise RuntimeError('recipe failed')\n"
    )
    for argv, error in [([], None), (["fail"], "recipe failed")]:
        store = dist.FileStore(str(tmp_path / f"store-{len(argv)}"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            if error is None:
                run_recipe(recipe)
            else:
                with pytest.raises(RuntimeError, match=error):
                    run_recipe(recipe, argv)
            assert not dist.is_initialized()
        finally:  # a failure here must not leave the group to the tests after it
            if dist.is_initialized():
                dist.destroy_process_group()


def test_example_recipe_learns_and_saves(tmp_path):
    out = tmp_path / "regression"
    run_recipe(REPO_ROOT / "recipes" / "example_regression.py", ["--output-dir", str(out)])
    scores = json.loads((out / "final" / "eval.json").read_text())
    assert scores["step"] == 300
    assert scores["heldout_mse"] < 0.05 * scores["constant_mse"], scores
    weights = load_file(out / "final" / "model.safetensors")
    assert weights["net.0.weight"].shape == (64, 2)
    assert json.loads((out / "final" / "config.json").read_text())["hidden"] == 64


def test_training_seconds_sums_row_intervals_and_skips_a_resume_gap(tmp_path):
    import json

    from anygen.training import seconds_per_step, training_seconds

    metrics = tmp_path / "metrics.jsonl"
    times = [100.0, 110.0, 125.0, 5000.0, 5020.0]  # stopped after 125, resumed at 5000
    metrics.write_text(
        "".join(json.dumps({"step": 10 * (i + 1), "time": t}) + "\n" for i, t in enumerate(times))
    )
    assert training_seconds(metrics) == 45.0
    assert seconds_per_step(metrics) == 1.5  # 45 s over the 30 steps of the kept intervals
    assert training_seconds(metrics, gap=10_000) == 4920.0
    assert training_seconds(tmp_path / "missing.jsonl") == 0.0
    assert seconds_per_step(tmp_path / "missing.jsonl") == 0.0


def test_training_device_reads_the_devices_a_run_logged(tmp_path):
    """A card names the device the run trained on, not the one of the call that bundled it
    (a `--resume --bundle` at other threads); runs logged before rows named one fall back."""
    from anygen.training import training_device

    _complete_run(tmp_path / "run", max_steps=2)
    logged = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert logged and {row["device"] for row in logged} == {device_description()}
    assert training_device(tmp_path / "run" / "metrics.jsonl") == device_description()
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    rows = [{"step": 10, "device": "cpu (1 thread)"}, {"step": 20, "device": "cpu (1 thread)"}]
    first.write_text("".join(json.dumps(r) + "\n" for r in rows))
    second.write_text(json.dumps({"step": 30, "device": "H200"}) + "\n")
    assert training_device(first) == "cpu (1 thread)"
    assert training_device(first, second) == "cpu (1 thread) then H200"
    (tmp_path / "old.jsonl").write_text(json.dumps({"step": 10, "time": 1.0}) + "\n")
    assert training_device(tmp_path / "old.jsonl", tmp_path / "missing.jsonl") == (
        device_description()
    )


def test_continuing_with_the_init_models_seed_warns(tmp_path, caplog):
    from anygen.training import warn_if_same_seed

    (tmp_path / "training.json").write_text(json.dumps({"seed": 8, "steps": 2500}))
    with caplog.at_level("WARNING", logger="anygen.training"):
        assert not warn_if_same_seed(tmp_path, 9)
        assert not caplog.records
        assert warn_if_same_seed(tmp_path, 8)
    assert "trained with seed 8, the seed of this run" in caplog.records[0].getMessage()
    assert not warn_if_same_seed(tmp_path / "no-record-here", 8)  # nothing to compare with
    (tmp_path / "training.json").write_text("[not a record")
    assert not warn_if_same_seed(tmp_path, 8)
    # a continued model: the seeds of the runs before it draw the same samples too
    earlier = {"seed": 0, "steps": 100, "started_from": {"seed": 3, "steps": 50}}
    (tmp_path / "training.json").write_text(json.dumps({"seed": 8, "started_from": earlier}))
    assert [warn_if_same_seed(tmp_path, s) for s in (0, 1, 3, 8)] == [True, False, True, True]


def test_lineage_records_the_runs_before_a_continuation(tmp_path):
    from anygen.training import lineage, lineage_text

    record = {"seed": 1, "steps": 4000, "train_time_s": 1935.8, "device": "cpu", "mix": {},
              "started_from": {"seed": 0, "steps": 33500, "train_time_s": 40249.1}}  # fmt: skip
    (tmp_path / "training.json").write_text(json.dumps(record))
    got = lineage(tmp_path)
    assert "mix" not in got and got["started_from"] == record["started_from"]
    assert lineage_text(got) == (
        "trained before by 4000 steps with seed 1 (1936 s on cpu), after 33500 steps with "
        "seed 0 (40249 s on an unrecorded device)"
    )
    assert lineage(tmp_path / "none") is None and lineage_text(None).startswith("its training")
    ldm = {"seed": 7, "denoiser_steps": 500, "train_time_s": {"vae": 20.0, "denoiser": 80.4}}
    assert (
        lineage_text(ldm)
        == "trained before by 500 steps with seed 7 (100 s on an unrecorded device)"
    )
    (tmp_path / "training.json").write_text("[1, 2]")
    assert lineage(tmp_path) is None


def test_a_resumed_continuation_keeps_the_lineage_its_first_run_read(tmp_path, caplog):
    """--resume --bundle after the bundle was replaced: the record of the run's own saved
    model wins, so the run does not become its own ancestor or warn about its own seed."""
    from anygen.training import starting_lineage, warn_if_same_seed

    bundle, run_model = tmp_path / "bundle", tmp_path / "run" / "model"
    bundle.mkdir()
    run_model.mkdir(parents=True)
    parent = {"seed": 3, "steps": 4000}
    (bundle / "training.json").write_text(json.dumps(parent))
    assert starting_lineage(bundle, run_model, resume=True) == parent  # nothing saved yet
    (run_model / "training.json").write_text(json.dumps({"seed": 5, "started_from": parent}))
    # the bundle now holds this run's own weights and record
    (bundle / "training.json").write_text(json.dumps({"seed": 5, "started_from": parent}))
    assert starting_lineage(bundle, run_model, resume=True) == parent
    assert starting_lineage(bundle, run_model, resume=False)["seed"] == 5
    with caplog.at_level("WARNING", logger="anygen.training"):
        assert not warn_if_same_seed(bundle, 5, parent)
        assert warn_if_same_seed(bundle, 5)  # read from the replaced bundle: itself
    assert "trained with seed 5" in caplog.text


def test_bundling_without_scores_warns(caplog):
    from anygen.training import warn_if_unscored_bundle

    with caplog.at_level("WARNING", logger="anygen.training"):
        assert not warn_if_unscored_bundle(False, 0, "assets/m")
        assert not warn_if_unscored_bundle(True, 300, "assets/m")
        assert not caplog.records
        assert warn_if_unscored_bundle(True, 0, "assets/m")
    assert caplog.records[0].getMessage() == (
        "--bundle with --eval-n 0: assets/m will be replaced by a model whose card has no"
        " shapes-eval scores (drop --eval-n 0 to score the bundled weights)"
    )


@pytest.mark.parametrize(
    "recipe, failing",
    [
        ("fusion_shapes.py", ["--tokenizer", "no-such-tokenizer"]),
        ("parti_shapes.py", ["--tokenizer", "no-such-tokenizer"]),
        ("ldm_shapes.py", ["--snr-floor", "-1"]),
        ("vq_shapes.py", ["--decoder-layers", "2"]),
    ],
)
def test_shapes_recipes_warn_of_an_unscored_bundle_before_training(recipe, failing, caplog):
    """The warning comes first: these runs stop at their first bad argument, after it."""
    module = load_recipe(TESTS_DIR.parent / "recipes" / recipe)
    argv = ["--output-dir", "out", "--bundle", "--eval-n", "0", *failing]
    with caplog.at_level("WARNING", logger="anygen.training"), pytest.raises(AnygenError):
        module.main(argv)
    assert "--bundle with --eval-n 0" in caplog.text


@pytest.mark.parametrize("recipe", ["parti_shapes.py", "ldm_shapes.py"])
def test_recipes_refuse_defaults_that_selection_would_overwrite(recipe, capsys):
    module = load_recipe(TESTS_DIR.parent / "recipes" / recipe)
    with pytest.raises(SystemExit):
        module.parse_args(["--output-dir", "out", "--guidance", "2"])
    assert "only with --select-n 0" in capsys.readouterr().err
    args = module.parse_args(["--output-dir", "out", "--guidance", "2", "--select-n", "0"])
    assert args.guidance == 2.0


def test_caption_forms_arg_parses_and_refuses_in_one_line():
    import argparse

    from anygen.training import caption_forms_arg

    assert caption_forms_arg("relation=3, conjunction=4,count=0") == {
        "relation": 3.0,
        "conjunction": 4.0,
        "count": 0.0,
    }
    for text, message in [
        ("place=2", "unknown caption form(s) ['place']"),
        ("position", "expected FORM=WEIGHT, got 'position'"),
        ("position=x", "expected FORM=WEIGHT, got 'position=x'"),
        ("position=-1", "must be finite and >= 0"),
        ("position=nan", "must be finite and >= 0"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            caption_forms_arg(text)


@pytest.mark.parametrize("recipe", ["ldm_shapes.py", "parti_shapes.py", "fusion_shapes.py"])
def test_shapes_recipes_choose_sampling_defaults_on_select_n_prompts(recipe):
    from anygen.eval.suites import SELECT_N

    module = load_recipe(TESTS_DIR.parent / "recipes" / recipe)
    assert module.parse_args(["--output-dir", "out"]).select_n == SELECT_N == 300
