"""A tiny training run for tests/test_training.py, importable and runnable as a script.

    python tests/_train_script.py --config '{"output_dir": "...", "max_steps": 8}' \
        [--kill-at-step 4] [--report-dir DIR]

--kill-at-step ends the process with os._exit(1) right after step N (and its checkpoint,
if one is due) is complete, as a crash would. --report-dir makes every process write
rank-<i>.json (steps it took, its parameters) there; used under `accelerate launch`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from anygen.training import StepInfo, TrainConfig, end_distributed, train

IN_FEATURES = 4


def make_model(seed: int = 0, dropout: float = 0.2) -> nn.Module:
    """A 4 -> 16 -> 1 MLP with dropout, so that a resume must restore the RNG."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, 1)
    )


def make_dataset(num_samples: int = 40, seed: int = 0) -> TensorDataset:
    """y = x . w + 0.5 sin(3 x0), fixed by the seed."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, IN_FEATURES, generator=generator)  # (N, 4)
    w = torch.tensor([1.0, -2.0, 0.5, 0.25])
    y = (x @ w + 0.5 * torch.sin(3 * x[:, 0])).unsqueeze(1)  # (N, 1)
    return TensorDataset(x, y)


def mse_loss(model: nn.Module, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    x, y = batch
    prediction = model(x)
    loss = nn.functional.mse_loss(prediction, y)
    return {"loss": loss, "mae": (prediction - y).abs().mean()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="TrainConfig fields as JSON")
    parser.add_argument("--kill-at-step", type=int, default=None)
    parser.add_argument("--report-dir", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    config = TrainConfig(**json.loads(args.config))

    steps_taken: list[int] = []

    def callback(info: StepInfo) -> None:
        steps_taken.append(info.step)
        if info.step == args.kill_at_step:
            os._exit(1)

    try:
        result = train(make_model(), mse_loss, make_dataset(), config, callbacks=[callback])
        if args.report_dir is not None:
            report = {
                "rank": result.accelerator.process_index,
                "num_processes": result.accelerator.num_processes,
                "steps": steps_taken,
                "params": [p.detach().cpu().flatten().tolist() for p in result.model.parameters()],
            }
            path = Path(args.report_dir) / f"rank-{result.accelerator.process_index}.json"
            path.write_text(json.dumps(report))
    finally:
        end_distributed()


if __name__ == "__main__":
    main()
