"""Shared parts of the benchmark suite: settings, timing, the machine and software a run
was on, FLOP and memory-bandwidth arithmetic, and the recorder that prints rows as they
come, a table at the end, and keeps the JSON file up to date after every row (so a run
cut short by a time limit still leaves what it measured)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from anygen import attention

# Datasheet peak dense bf16 tensor-core FLOP/s (no sparsity), in TFLOP/s. Matched by
# substring of torch.cuda.get_device_name(), first match wins (so PCIe before SXM).
GPU_PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H200": 989.0,
    "H100": 989.0,  # SXM
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}
# Datasheet memory bandwidth, GB/s, matched the same way.
GPU_BANDWIDTH_GBS = {
    "H100 PCIe": 2000.0,
    "H200": 4800.0,
    "H100": 3350.0,  # SXM
    "A100": 2039.0,
    "L40S": 864.0,
    "L4": 300.0,
    "A10": 600.0,
}

SIZES = ("tiny", "real")
VARIANTS = ("eager", "compiled", "all")
# what the GPU-only variants are, and why a CPU run skips them
COMPILED_ONLY_ON_GPU = (
    "GPU-only: torch.compile / CUDA graphs / static KV cache (compiling costs ~16 s per "
    "function on the 2-core CPU machine and pays only on an accelerator)"
)


@dataclass
class Settings:
    """What one `python -m benchmarks run` asks for."""

    size: str = "tiny"  # "tiny": CPU-sized configs; "real": SD-1.5 / ~1B configs for a GPU
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype | None = None  # None: each benchmark's default for the device
    repeats: int = 3  # timed runs per case after one warm-up (median reported)
    variant: str = "eager"  # "eager", "compiled" (GPU-only variants) or "all"
    attention: tuple[str, ...] | None = None  # backends to compare; None: each one's own
    positions: int | None = None  # decoding: image positions (None: tiny preset's / 256 real)

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {self.size!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")

    @property
    def real(self) -> bool:
        return self.size == "real"

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def eager(self) -> bool:
        return self.variant in ("eager", "all")

    @property
    def compiled(self) -> bool:
        """The compiled / CUDA-graph / static-cache variants are asked for (GPU only)."""
        return self.variant in ("compiled", "all")

    def dtype_or(self, cuda_default: torch.dtype) -> torch.dtype:
        """The asked dtype, else ``cuda_default`` on CUDA and fp32 elsewhere."""
        if self.dtype is not None:
            return self.dtype
        return cuda_default if self.cuda else torch.float32


def attention_backends(s: Settings, rec: Recorder, name: str) -> list[str]:
    """The attention backends benchmark ``name`` compares: those asked for, else xformers,
    sdpa and math; xformers is dropped, with the reason recorded, where it cannot run."""
    wanted = list(s.attention or ("xformers", "sdpa", "math"))
    if "auto" in wanted:
        wanted = [attention.auto_backend(s.device) if b == "auto" else b for b in wanted]
        wanted = list(dict.fromkeys(wanted))
    if "xformers" in wanted and not attention.xformers_usable(s.device):
        reason = (
            "xformers runs on CUDA only"
            if not s.cuda
            else "xformers is not installed or has no kernels for this torch/CUDA "
            "(python -m xformers.info)"
        )
        rec.skip(name, "attention xformers", reason)
        wanted.remove("xformers")
    return wanted


# -----------------------------------------------------------------------------
# timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    cases: dict[str, Callable[[], Any]], repeats: int, device: torch.device, warmup: bool = True
) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds of each case over ``repeats`` runs, interleaved so that drift (other
    jobs, clocks) hits every case alike, after one warm-up run of each; and the output of
    each case's last run."""
    outputs: dict[str, Any] = {}
    if warmup:
        for name, fn in cases.items():
            outputs[name] = fn()
        sync(device)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            sync(device)
            start = time.perf_counter()
            outputs[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


# -----------------------------------------------------------------------------
# the machine


def _lookup(table: dict[str, float], name: str) -> float | None:
    return next((value for key, value in table.items() if key in name), None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_flops(device: torch.device) -> float | None:
    """Datasheet peak dense bf16 FLOP/s of a known GPU; None on a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    tflops = _lookup(GPU_PEAK_BF16_TFLOPS, torch.cuda.get_device_name(device))
    return None if tflops is None else tflops * 1e12


def memory_bandwidth(device: torch.device) -> tuple[float, str]:
    """Bytes/s and where the figure comes from: the datasheet for a known GPU, else a
    measured copy of 64 MiB (beyond the caches; read + write counted), best of 5."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        gbs = _lookup(GPU_BANDWIDTH_GBS, name)
        if gbs is not None:
            return gbs * 1e9, f"datasheet ({name})"
    x = torch.empty(64 * 2**20 // 4, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * x.numel() * 4 / best, "measured copy"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """Date, machine and software of a run."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "xformers": _version("xformers"),
        "attention_auto": attention.auto_backend(device),
    }


# -----------------------------------------------------------------------------
# arithmetic


def matmul_params(model: torch.nn.Module, input_embedding: torch.nn.Module | None) -> int:
    """Parameters that take part in matrix products: all but the input embedding table,
    which is only indexed (unless it is tied to the output head, which reads it whole)."""
    total = sum(p.numel() for p in model.parameters())
    if input_embedding is None:
        return total
    table = input_embedding.weight
    tied = any(p is table for name, p in model.named_parameters() if "lm_head" in name)
    return total if tied else total - table.numel()


def training_flops_per_token(
    n_params: int, n_layers: int, n_heads: int, head_dim: int, seq_len: int
) -> float:
    """FLOPs to train on one token: 6 N for the matrix products (2 forward, 4 backward)
    plus 12 L H Q T for attention scores and values (PaLM, Chowdhery et al. 2022, app. B;
    dense T x T, causal masking not discounted, as there)."""
    return 6.0 * n_params + 12.0 * n_layers * n_heads * head_dim * seq_len


def mfu(flops_per_step: float, step_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak (None without a peak)."""
    if peak is None:
        return None
    return flops_per_step / step_s / peak


def bandwidth_bound_s(bytes_per_step: float, steps: int, bandwidth: float) -> float:
    """Seconds ``steps`` decoding steps take at least when each reads ``bytes_per_step``
    from memory at ``bandwidth`` bytes/s (batch-1 decoding is memory-bound)."""
    return steps * bytes_per_step / bandwidth


# -----------------------------------------------------------------------------
# output


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of ``rows`` over the union of their keys, in order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(out)


class Recorder:
    """Collects rows per benchmark; prints each as it comes and rewrites ``json_path``."""

    def __init__(self, meta: dict, json_path: Path | None = None, echo: bool = True) -> None:
        self.meta = meta
        self.json_path = json_path
        self.echo = echo
        self.rows: list[dict] = []
        self.skipped: list[dict] = []

    def row(self, benchmark: str, row: dict) -> dict:
        row = {"benchmark": benchmark, **row}
        self.rows.append(row)
        if self.echo:
            print(json.dumps(row), flush=True)
        self._write()
        return row

    def skip(self, benchmark: str, what: str, reason: str) -> None:
        self.skipped.append({"benchmark": benchmark, "what": what, "reason": reason})
        if self.echo:
            print(f"[{benchmark}] skipped {what}: {reason}", flush=True)
        self._write()

    def of(self, benchmark: str) -> list[dict]:
        return [r for r in self.rows if r["benchmark"] == benchmark]

    def tables(self) -> str:
        parts = []
        for name in dict.fromkeys(r["benchmark"] for r in self.rows):
            rows = [{k: v for k, v in r.items() if k != "benchmark"} for r in self.of(name)]
            parts.append(f"## {name}\n{format_table(rows)}")
        if self.skipped:
            parts.append(
                "## skipped\n"
                + "\n".join(f"{s['benchmark']}: {s['what']}: {s['reason']}" for s in self.skipped)
            )
        return "\n\n".join(parts)

    def as_json(self) -> dict:
        return {"meta": self.meta, "rows": self.rows, "skipped": self.skipped}

    def _write(self) -> None:
        if self.json_path is not None:
            self.json_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.json_path.with_suffix(self.json_path.suffix + ".tmp")
            tmp.write_text(json.dumps(self.as_json(), indent=2) + "\n")
            tmp.replace(self.json_path)
