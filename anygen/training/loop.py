"""The training loop: one function, `train`, on HuggingFace accelerate.

The same code runs in one process, on several GPUs or nodes, or sharded with FSDP or
DeepSpeed: how it is distributed is `accelerate launch`'s business and its config's,
not this file's. Models own their losses; the loop only asks for

    loss_fn(model, batch) -> Tensor | dict[str, Tensor]   # a dict holds "loss" + terms to log

Steps are optimizer steps. Each takes `gradient_accumulation_steps` micro-batches of
`batch_size` samples on every process, so one step sees
batch_size * gradient_accumulation_steps * num_processes samples.

Data order is a function of the seed alone: epoch e visits the dataset in the order
`randperm(len(dataset), seed, e)`, and a resumed run skips exactly the micro-batches that
were consumed before its checkpoint, so N steps in one go and N/2 + resume + N/2 give the
same weights, optimizer and scheduler states (tests/test_training.py holds this).

Output directory:
    OUTPUT_DIR/train_config.json      the TrainConfig of the latest start
    OUTPUT_DIR/metrics.jsonl          one JSON row per logged step
    OUTPUT_DIR/checkpoints/step-*/    complete checkpoints (see checkpoint.py)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, GradientAccumulationPlugin, set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from tqdm.auto import tqdm

from anygen.errors import AnygenError, CheckpointError, UserInputError
from anygen.training import checkpoint as ckpt

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

logger = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
METRICS_FILENAME = "metrics.jsonl"
CONFIG_FILENAME = "train_config.json"
# Columns of metrics.jsonl that a loss term may not take as its name.
_METRIC_COLUMNS = (
    "step", "loss", "lr", "grad_norm", "samples_per_s", "epoch", "elapsed_s", "time", "device"
)  # fmt: skip
# Settings that fix the data position of a step; a resume under other values warns (a
# dataset of another size, as recipes that size it by --steps make, is shuffled anew).
_DATA_ORDER_SETTINGS = (
    "seed", "batch_size", "gradient_accumulation_steps", "num_processes", "dataset_size"
)  # fmt: skip

LossOutput = torch.Tensor | Mapping[str, torch.Tensor | float]
LossFn = Callable[[nn.Module, Any], LossOutput]


class TrainingDivergedError(AnygenError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    """Everything the loop needs besides the model, its loss and the data."""

    output_dir: str
    max_steps: int = 1000
    batch_size: int = 32  # per process and micro-batch
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = 1e-8
    lr_schedule: str = "constant"  # one of LR_SCHEDULES
    warmup_steps: int = 0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # "no" | "fp16" (GPU only) | "bf16"
    # torch.compile the model's forward (and so its backward) for the run; the model train()
    # returns runs eagerly again. Pays off on a GPU (docs/benchmarks.md: the 1b training
    # benchmark's same Module.compile() raised MFU from 0.316 to 0.417), not on a small CPU.
    compile: bool = False
    max_grad_norm: float | None = 1.0  # None: no clipping
    # EMA of the trainable parameters (diffusers' EMAModel, which caps the decay of
    # optimizer step t at (1 + t) / (10 + t)); None disables it.
    ema_decay: float | None = None
    checkpoint_every: int | None = 500  # None: only the final checkpoint
    keep_last_checkpoints: int | None = 3  # None: keep all
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    resume: str | None = None  # "latest" | a checkpoint directory | None (fresh start)

    def __post_init__(self) -> None:
        self.output_dir = os.fspath(self.output_dir)
        self.adam_betas = tuple(self.adam_betas)
        if not self.output_dir:
            raise UserInputError("TrainConfig.output_dir must not be empty")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserInputError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("checkpoint_every", "keep_last_checkpoints"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserInputError(
                    f"TrainConfig.{name} must be None or an integer >= 1, got {value!r}"
                )
        if self.warmup_steps < 0 or self.num_workers < 0:
            raise UserInputError("TrainConfig.warmup_steps and num_workers must be >= 0")
        if self.learning_rate <= 0 or self.weight_decay < 0:
            raise UserInputError(
                f"TrainConfig needs learning_rate > 0 and weight_decay >= 0, "
                f"got {self.learning_rate} and {self.weight_decay}"
            )
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise UserInputError(
                f"TrainConfig.adam_betas must be two numbers in [0, 1), got {self.adam_betas}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserInputError(
                f"unknown lr_schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}"
            )
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise UserInputError(
                f"unknown mixed_precision {self.mixed_precision!r}; choose one of {', '.join(MIXED_PRECISIONS)}"
            )
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise UserInputError(
                f"TrainConfig.max_grad_norm must be None or > 0, got {self.max_grad_norm}"
            )
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise UserInputError(
                f"TrainConfig.ema_decay must be None or in (0, 1), got {self.ema_decay}"
            )


@dataclass
class StepInfo:
    """What a callback sees after each optimizer step (on every process)."""

    step: int
    max_steps: int
    model: nn.Module  # as prepared by accelerate (wrapped under DDP/FSDP)
    accelerator: Accelerator
    ema: EMAModel | None
    metrics: dict[str, float] | None  # the metrics.jsonl row when this step was logged
    checkpoint: Path | None  # the checkpoint completed at this step, if any


Callback = Callable[[StepInfo], None]


@dataclass
class TrainResult:
    model: nn.Module  # unwrapped; holds the EMA weights when EMA is on
    step: int
    start_step: int  # the step this invocation began at: 0, or its checkpoint's step
    loss: float | None  # the last logged loss (mean over its window and all processes)
    metrics: dict[str, float] | None  # the last logged row
    output_dir: Path
    checkpoint: Path | None  # the last complete checkpoint
    resumed_from: Path | None
    accelerator: Accelerator = field(repr=False)
    ema: EMAModel | None = field(default=None, repr=False)

    @property
    def is_main_process(self) -> bool:
        """Save files only where this is true."""
        return self.accelerator.is_main_process


class SeededSampler(Sampler[int]):
    """A fresh random order of range(num_samples) each epoch, a function of (seed, epoch) only."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(_epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


def train(
    model: nn.Module,
    loss_fn: LossFn,
    dataset: Dataset,
    config: TrainConfig,
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    trainable_parameters: Iterable[nn.Parameter] | None = None,
    callbacks: Sequence[Callback] | None = None,
) -> TrainResult:
    """Train `model` for `config.max_steps` optimizer steps; returns the final model.

    `loss_fn(model, batch)` gets the accelerate-prepared model and must run it through
    its forward (`model(...)`), which is what DDP and FSDP wrap. `dataset` is map-style
    (len and indexing). Without `optimizer`, AdamW over `trainable_parameters` (default:
    every parameter with requires_grad) is built from the config. Callbacks run on every
    process after each step, after its checkpoint; the model they see is the prepared one.

    One accelerate state lives per process: a second `train` in the same process must use
    the same mixed_precision (tests reset it between runs).
    """
    callbacks = list(callbacks or [])
    _check_dataset(dataset, config)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.gradient_accumulation_steps,
            # A step is always gradient_accumulation_steps micro-batches, also across the
            # end of an epoch, so that steps and data positions map one to one.
            sync_with_dataloader=False,
            adjust_scheduler=False,
        ),
    )
    _check_device(accelerator, config)
    is_main = accelerator.is_main_process
    output_dir = Path(config.output_dir)
    resume_from = _resolve_resume(accelerator, config)
    set_seed(config.seed, device_specific=True)

    if trainable_parameters is not None:
        params = list(trainable_parameters)
    elif optimizer is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserInputError("train() found no trainable parameters (none has requires_grad)")
    if optimizer is None:
        optimizer = torch.optim.AdamW(
            params,
            lr=config.learning_rate,
            betas=config.adam_betas,
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
        )
    lr_scheduler = _make_lr_scheduler(optimizer, config, accelerator.num_processes)

    sampler = SeededSampler(len(dataset), config.seed)
    # Worker seeds come from this generator, not from the global RNG, so that making a
    # data iterator leaves the RNG that dropout and noise draw from untouched.
    loader_generator = torch.Generator()
    dataloader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_fn,
        num_workers=config.num_workers,
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=config.num_workers > 0,
        generator=loader_generator,
    )
    if config.compile:
        if is_main and all(type(m).__module__.startswith("torch.") for m in model.modules()):
            logger.warning(
                "compile=True compiles nothing here: %s is built only of torch's own modules, "
                "whose frames torch.compile skips; wrap it in a module class of your own",
                type(model).__name__,
            )
        model.compile()  # in place: parameter names and checkpoints stay the eager model's
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, dataloader, lr_scheduler
    )
    batches_per_epoch = len(dataloader)
    if batches_per_epoch == 0:
        raise UserInputError(
            f"the dataset ({len(dataset)} samples) holds no full batch of batch_size={config.batch_size} "
            f"on each of {accelerator.num_processes} process(es)"
        )

    ema = None
    if config.ema_decay is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=config.ema_decay, foreach=True)
        ema.to(accelerator.device)

    run_info = {
        "seed": config.seed,
        "batch_size": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "num_processes": accelerator.num_processes,
        "dataset_size": len(dataset),
    }
    start_step = 0
    if resume_from is not None:
        start_step = _load_checkpoint(
            accelerator, resume_from, run_info, ema, config, optimizer, lr_scheduler
        )
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        config_row = {
            **dataclasses.asdict(config),
            **run_info,
            "resumed_from": str(resume_from) if resume_from else None,
        }
        (output_dir / CONFIG_FILENAME).write_text(json.dumps(config_row, indent=2) + "\n")
        _truncate_metrics(output_dir / METRICS_FILENAME, start_step)
        logger.info(
            "training %d steps from step %d: %d samples/step (%d per process x %d accumulation x %d "
            "processes), %d micro-batches/epoch per process, mixed_precision=%s, device=%s",
            config.max_steps,
            start_step,
            config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes,
            config.batch_size,
            config.gradient_accumulation_steps,
            accelerator.num_processes,
            batches_per_epoch,
            config.mixed_precision,
            accelerator.device,
        )

    step = start_step
    epoch, skip = divmod(step * config.gradient_accumulation_steps, batches_per_epoch)
    window = _LossWindow()
    # A resume reports the row its checkpoint's run logged last until it logs one itself,
    # so a resume that trains nothing still gives the run's last loss.
    last_metrics = _last_row(output_dir / METRICS_FILENAME, start_step) if resume_from else None
    last_checkpoint = resume_from
    grad_norm: torch.Tensor | float | None = None
    from anygen.training import device_description  # the package imports this module

    device = device_description()
    run_start = time.perf_counter()
    progress = tqdm(
        total=config.max_steps,
        initial=start_step,
        desc="train",
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )
    model.train()
    while step < config.max_steps:
        sampler.set_epoch(epoch)
        loader_generator.manual_seed(_epoch_seed(config.seed, epoch) + 1)
        dataloader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss, terms = _split_loss_output(loss_fn(model, batch))
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(
                        model.parameters(), config.max_grad_norm
                    )
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window.add(loss, terms)
            if not accelerator.sync_gradients:
                continue

            step += 1
            if ema is not None:
                ema.step(params)
            progress.update(1)
            metrics = None
            if step % config.log_every == 0 or step == config.max_steps:
                metrics = window.summarize(accelerator, step)
                metrics.update(
                    lr=lr_scheduler.get_last_lr()[0],
                    epoch=epoch,
                    elapsed_s=round(time.perf_counter() - run_start, 3),
                    time=time.time(),
                )
                if isinstance(grad_norm, torch.Tensor | float):
                    metrics["grad_norm"] = float(grad_norm)
                metrics["samples_per_s"] *= config.batch_size * accelerator.num_processes
                if is_main:  # each row names its device: a resumed run may change it
                    _append_metrics(output_dir / METRICS_FILENAME, {**metrics, "device": device})
                progress.set_postfix(loss=f"{metrics['loss']:.4g}", lr=f"{metrics['lr']:.3g}")
                last_metrics = metrics
            saved = None
            every = config.checkpoint_every
            if (every is not None and step % every == 0) or step == config.max_steps:
                save_start = time.perf_counter()
                saved = ckpt.save_checkpoint(accelerator, output_dir, step, run_info, ema)
                last_checkpoint = saved
                if is_main:
                    ckpt.prune_checkpoints(output_dir, config.keep_last_checkpoints)
                window.exclude(time.perf_counter() - save_start)
            if callbacks:
                info = StepInfo(step, config.max_steps, model, accelerator, ema, metrics, saved)
                for callback in callbacks:
                    callback(info)
            if step >= config.max_steps:
                break
        epoch, skip = epoch + 1, 0
    progress.close()

    accelerator.wait_for_everyone()
    if start_step >= config.max_steps and is_main:
        logger.info(
            "checkpoint %s is already at max_steps=%d: nothing to train",
            resume_from,
            config.max_steps,
        )
    if ema is not None:
        ema.copy_to(params)
    trained = accelerator.unwrap_model(model)
    if config.compile:
        trained._compiled_call_impl = None  # undoes Module.compile(): eager calls again
    return TrainResult(
        model=trained,
        step=step,
        start_step=start_step,
        loss=last_metrics["loss"] if last_metrics else None,
        metrics=last_metrics,
        output_dir=output_dir,
        checkpoint=last_checkpoint,
        resumed_from=resume_from,
        accelerator=accelerator,
        ema=ema,
    )


class _LossWindow:
    """Sums of the loss and its terms over the micro-batches since the last log."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.start = time.perf_counter()
        self.excluded_s = 0.0

    def exclude(self, seconds: float) -> None:
        """Leave time spent outside training (checkpointing) out of the throughput."""
        self.excluded_s += seconds

    def add(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        for name, value in {"loss": loss, **terms}.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += 1

    def summarize(self, accelerator: Accelerator, step: int) -> dict[str, float]:
        """Means over the window and all processes (a collective: every process calls it)."""
        names = sorted(self.sums)
        means = torch.stack([self.sums[name] for name in names]) / self.count  # (n_terms,)
        means = accelerator.reduce(means, reduction="mean")
        row: dict[str, float] = {"step": step}
        row.update({name: float(value) for name, value in zip(names, means.tolist(), strict=True)})
        if not math.isfinite(row["loss"]):
            raise TrainingDivergedError(
                f"the loss is {row['loss']} at step {step}: training diverged "
                "(try a lower learning_rate, max_grad_norm, or mixed_precision='no')"
            )
        # micro-batches per second on one process; the caller scales it to samples.
        elapsed = time.perf_counter() - self.start - self.excluded_s
        row["samples_per_s"] = self.count / max(elapsed, 1e-9)
        self.reset()
        return row


def _split_loss_output(output: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, other terms) from what loss_fn returned, checked."""
    if isinstance(output, torch.Tensor):
        loss, raw_terms = output, {}
    elif isinstance(output, Mapping):
        if "loss" not in output:
            raise UserInputError(
                f"loss_fn returned a dict without a 'loss' entry (keys: {', '.join(map(str, output))})"
            )
        loss = output["loss"]
        raw_terms = {name: value for name, value in output.items() if name != "loss"}
    else:
        raise UserInputError(
            f"loss_fn must return a Tensor or a dict with a 'loss' Tensor, got {type(output).__name__}"
        )
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise UserInputError(f"loss_fn's loss must be a scalar Tensor, got {shape}")
    if not loss.requires_grad:
        raise UserInputError(
            "loss_fn's loss does not require grad: it does not depend on any trainable parameter"
        )
    terms = {}
    for name, value in raw_terms.items():
        if name in _METRIC_COLUMNS:
            raise UserInputError(
                f"loss_fn returned a term named {name!r}, which is a metrics column"
            )
        if isinstance(value, int | float):
            value = torch.tensor(float(value), device=loss.device)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise UserInputError(f"loss_fn's term {name!r} must be a scalar Tensor or a number")
        terms[name] = value.reshape(())
    return loss, terms


def _check_dataset(dataset: Dataset, config: TrainConfig) -> None:
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise UserInputError(
            "train() needs a map-style dataset (__len__ and __getitem__) so that data order can be "
            f"seeded and resumed; got {type(dataset).__name__}"
        )
    if len(dataset) < config.batch_size:
        raise UserInputError(
            f"the dataset has {len(dataset)} samples, fewer than batch_size={config.batch_size}"
        )


def _check_device(accelerator: Accelerator, config: TrainConfig) -> None:
    device = accelerator.device.type
    if config.mixed_precision == "fp16" and device == "cpu":
        raise UserInputError(
            "mixed_precision='fp16' needs a GPU, but this run is on the CPU; "
            "use mixed_precision='no' (fp32) or 'bf16' (slow on most CPUs)"
        )
    if config.mixed_precision == "bf16" and device == "cpu" and accelerator.is_main_process:
        logger.warning(
            "mixed_precision='bf16' on the CPU is allowed but often ~10x slower than fp32"
        )
    if config.ema_decay is not None:
        sharded = accelerator.distributed_type == DistributedType.FSDP
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            sharded = getattr(accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3
        if sharded:
            raise UserInputError(
                f"EMA (ema_decay={config.ema_decay}) is not supported with sharded parameters "
                f"({accelerator.distributed_type.value}); use DDP or DeepSpeed ZeRO-1/2, or ema_decay=None"
            )


def _make_lr_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, num_processes: int
) -> torch.optim.lr_scheduler.LRScheduler:
    from diffusers.optimization import get_scheduler

    # accelerate's prepared scheduler advances num_processes times per optimizer step
    # (AcceleratedScheduler with split_batches=False), so the schedule is stretched to match.
    return get_scheduler(
        config.lr_schedule,
        optimizer,
        num_warmup_steps=config.warmup_steps * num_processes,
        num_training_steps=config.max_steps * num_processes,
    )


def _resolve_resume(accelerator: Accelerator, config: TrainConfig) -> Path | None:
    """The checkpoint to resume from; cleans up incomplete ones (main process)."""
    output_dir = Path(config.output_dir)
    explicit = config.resume not in (None, "latest")
    if explicit:
        step = ckpt.read_marker(config.resume)["step"]  # CheckpointError unless complete
    if accelerator.is_main_process:
        ckpt.remove_incomplete(output_dir)
    accelerator.wait_for_everyone()
    if explicit:
        path = Path(config.resume)
        later = [p for s, p in ckpt.list_checkpoints(output_dir) if s > step]
        if later:  # they would pass for this run's own: `latest` and pruning prefer them
            raise UserInputError(
                f"{output_dir} holds checkpoints after {path.name} "
                f"({', '.join(p.name for p in later)}): remove them to train again from "
                "there, or resume from the latest"
            )
        return path
    if config.resume is None:
        latest = ckpt.latest_checkpoint(output_dir)
        if latest is not None:
            raise UserInputError(
                f"{output_dir} already holds checkpoints (latest: {latest.name}); "
                "pass resume='latest' to continue that run, or choose another output_dir"
            )
        return None
    latest = ckpt.latest_checkpoint(output_dir)  # resume == "latest"
    if latest is None and accelerator.is_main_process:
        logger.info(
            "resume='latest': no complete checkpoint in %s, starting from step 0", output_dir
        )
    return latest


def _load_checkpoint(
    accelerator: Accelerator,
    path: Path,
    run_info: dict[str, int],
    ema: EMAModel | None,
    config: TrainConfig,
    optimizer,
    lr_scheduler,
) -> int:
    """Load `path` into the prepared objects; returns its step. The optimizer keeps this
    run's learning rate, weight decay and betas, should they differ from the checkpoint's
    (the checkpoint's would otherwise win silently)."""
    marker = ckpt.read_marker(path)
    step = marker["step"]
    has_ema = (path / ckpt.EMA_WEIGHTS).is_file()
    if has_ema != (ema is not None):
        raise CheckpointError(
            f"checkpoint {path} was saved {'with' if has_ema else 'without'} EMA but "
            f"ema_decay={config.ema_decay}; resume with the same EMA setting"
        )
    changed = [
        name for name in _DATA_ORDER_SETTINGS if marker.get(name, run_info[name]) != run_info[name]
    ]
    if changed and accelerator.is_main_process:
        logger.warning(
            "resuming %s with other %s than it was saved with: training continues, but the data "
            "order will not continue exactly",
            path,
            ", ".join(f"{name} ({marker[name]} -> {run_info[name]})" for name in changed),
        )
    asked = _hyperparameters(optimizer)
    accelerator.load_state(str(path))
    # accelerate restores its micro-batch count; under another accumulation it would end
    # the first step early: count the steps done at this run's accumulation
    accelerator.step = step * config.gradient_accumulation_steps
    saved = _hyperparameters(optimizer)
    if saved != asked:
        _apply_hyperparameters(optimizer, lr_scheduler, asked)
        if accelerator.is_main_process:
            logger.warning(
                "resuming %s with other optimizer settings than it was saved with (%s -> %s): "
                "the new ones apply from step %d on",
                path,
                saved,
                asked,
                step,
            )
    if ema is not None:
        ckpt.load_ema(ema, path)
    if accelerator.is_main_process:
        logger.info("resumed from %s at step %d", path, step)
    return step


_HYPERPARAMETERS = ("initial_lr", "weight_decay", "betas")


def _hyperparameters(optimizer) -> list[dict]:
    """Each param group's peak learning rate, weight decay and betas."""
    return [
        {k: tuple(g[k]) if k == "betas" else g.get(k) for k in _HYPERPARAMETERS if k in g}
        for g in optimizer.param_groups
    ]


def _apply_hyperparameters(optimizer, lr_scheduler, values: list[dict]) -> None:
    """Put ``values`` into the param groups, and the learning rate the schedule gives at its
    restored position under the new peak."""
    for group, value in zip(optimizer.param_groups, values, strict=True):
        group.update(value)
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
    scheduler.base_lrs = [value["initial_lr"] for value in values]
    factors = [f(scheduler.last_epoch) for f in getattr(scheduler, "lr_lambdas", [])]
    if len(factors) == len(values):
        lrs = [base * f for base, f in zip(scheduler.base_lrs, factors, strict=True)]
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        scheduler._last_lr = lrs


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows after `last_step`: a resumed run rewrites them."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(rows):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a run's ``metrics.jsonl`` ([] when there is none)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _last_row(path: Path, last_step: int) -> dict[str, float] | None:
    """The numbers of the last row of ``metrics.jsonl`` at or before `last_step` (None when
    there is none): the metrics a step reports, without the row's device."""
    rows = [row for row in read_metrics(path) if row.get("step", 0) <= last_step]
    return {k: v for k, v in rows[-1].items() if k != "device"} if rows else None


def _append_metrics(path: Path, row: dict[str, float]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919) % (2**63)
