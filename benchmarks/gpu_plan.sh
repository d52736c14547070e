#!/usr/bin/env bash
# The GPU plan: every real-size benchmark on one GPU in about 9 minutes (8.8 on an H100,
# 2026-12-06, both passes cut at their limits), JSON and logs under $OUT (default
# benchmark-results/). From the repository root:
#
#     bash benchmarks/gpu_plan.sh
#
# It needs CUDA torch, transformers, accelerate and safetensors (the GPU machine has
# them), diffusers and einops (installed from wheels/ when missing: see
# docs/benchmarks.md for the `pip download` line), and optionally xformers
# (wheels/xformers-*.whl, installed with --no-deps so that torch is left alone). Each
# pass has a time limit and the JSON is rewritten after every row, so a pass cut short
# still leaves what it measured.
set -uo pipefail
out="${OUT:-benchmark-results}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# 0. software: bring what is missing from wheels/, never touching torch. Where the
#    wheels would not fit the device tool's 64 MiB, wheels/site.tar.xz may hold their
#    unpacked contents instead (docs/benchmarks.md); either goes into a --target folder on
#    PYTHONPATH, so the machine's own packages stay as they are.
py="${PYTHON:-python3}"
site="${ANYGEN_SITE:-/tmp/anygen-site}"
if [ -f wheels/site.tar.xz ]; then
    mkdir -p "$site" && tar -xJf wheels/site.tar.xz -C "$site" && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -d wheels ]; then
    for pkg in diffusers einops; do
        $py -c "import $pkg" 2>/dev/null \
            || $py -m pip install -q --no-index --find-links wheels "$pkg" \
            || echo "could not install $pkg from wheels/" >&2
    done
    if ! $py -c "import xformers" 2>/dev/null && compgen -G "wheels/xformers-*.whl" >/dev/null; then
        $py -m pip install -q --no-deps wheels/xformers-*.whl || echo "xformers: install failed" >&2
    fi
fi
$py - <<'PY' || exit 1
import importlib.util
missing = [m for m in ("torch", "diffusers", "transformers", "einops") if importlib.util.find_spec(m) is None]
if missing:
    raise SystemExit(f"missing {missing}: carry their wheels in wheels/ (docs/benchmarks.md)")
import torch
assert torch.cuda.is_available(), "no CUDA device"
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
PY
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv > "$out/gpu.txt" 2>&1
# whether xformers' kernels load for this torch/CUDA ("available" per operator)
$py -m xformers.info > "$out/xformers-info.txt" 2>&1 || echo "xformers: not installed or broken" >> "$out/xformers-info.txt"
$py -c "from anygen.attention import auto_backend; print('attention auto ->', auto_backend('cuda'))" | tee "$out/attention-auto.txt"

# 1. eager pass, every benchmark (~5 min, cut at 300 s): what the last GPU run (docs/benchmarks.md)
#    lacks first: the fusion and parti recompute references at batch 1, 1b-continuous
timeout 300 $py -m benchmarks run fusion parti ldm train decoders --size real --device cuda \
    --json "$out/real-eager.json" > "$out/real-eager.log" 2>&1
echo "eager pass: exit $?"; tail -n 60 "$out/real-eager.log"

# 2. the GPU-only variants: static KV cache + CUDA graphs, torch.compile (~3 min; compiling
#    takes most of it, so what does not fit is cut: run the rest one by one after)
timeout 170 $py -m benchmarks run ldm fusion train --size real --device cuda --variant compiled \
    --json "$out/real-compiled.json" > "$out/real-compiled.log" 2>&1
echo "compiled pass: exit $?"; tail -n 40 "$out/real-compiled.log"

# 3. xformers and sdpa give the same images (skipped, with its reason, without xformers)
if $py -c "import pytest" 2>/dev/null; then
    timeout 60 $py -m pytest -q -p no:cacheprovider tests/test_benchmarks.py \
        -k "xformers_and_sdpa or auto" 2>&1 | tail -n 5 | tee "$out/pytest-gpu.txt"
fi
ls -l "$out"
