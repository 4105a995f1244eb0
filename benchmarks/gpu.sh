#!/usr/bin/env bash
# One short GPU session (run it through the device tool when a GPU is lent; it needs no network):
#   bash benchmarks/gpu.sh            # writes into $OUT (or ./gpu-out): tests.txt, bench.txt, bench.json, cifar.txt
# It uses the machine's own python3 with PyTorch+CUDA and difflo from this checkout (PYTHONPATH=src);
# diffusers (for the benchmark's peer) is installed from wheels carried in wheels/ if present
# (`pip download diffusers==0.36.0 --no-deps -d wheels` on a machine with the registry).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src
PY=${PYTHON:-python3}
[ -d wheels ] && $PY -m pip install -q --no-deps wheels/*.whl
$PY - <<'PY' | tee "$OUT/machine.txt"
import torch; print(torch.__version__, torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported())
PY
# 1) the CUDA paths: bf16/fp16 autocast, auto, compile, NCCL through torchrun (tests/unit/test_cuda.py), plus the
#    precision and sampler tests on the GPU's host
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/unit/test_cuda.py tests/unit/test_precision.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
# 2) the benchmark on the GPU, larger batches, no RSS / grid (host memory is not the question there)
timeout 240 $PY benchmarks/run.py --device cuda --batch-sizes 128,256 --repeats 3 --skip-memory --skip-grid \
  --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1; tail -25 "$OUT/bench.txt"
# 3) a few hundred steps of the CIFAR-10 config on random data (the images' content does not change speed)
timeout 120 $PY - <<'PY' 2>&1 | tail -5 | tee "$OUT/cifar.txt"
import time, numpy as np, torch
from difflo import config as config_mod, data, train as train_mod
cfg = config_mod.load("configs/cifar10.yaml", ["train.steps=300", "train.sample_every=0", "train.ckpt_every=300",
                                               "train.device=cuda", "train.log_every=50"])
rng = np.random.default_rng(0)
fake = data.ArrayDataset(rng.integers(0, 256, (5000, 32, 32, 3), dtype=np.uint8),
                         rng.integers(0, 10, 5000).astype(np.int64), 10, name="cifar10-random")
data.from_config = lambda c: fake
t0 = time.time(); train_mod.train(cfg, "/tmp/gpu-cifar", progress=False); print(f"300 steps in {time.time() - t0:.1f} s")
PY
