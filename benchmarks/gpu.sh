#!/usr/bin/env bash
# One short GPU session (run it through the device tool when a GPU is lent; it needs no network):
#   bash benchmarks/gpu.sh            # writes into $OUT (or ./gpu-out): tests.txt, bench.txt, bench.json, cifar.txt
# It uses the machine's own python3 with PyTorch+CUDA and difflo from this checkout (PYTHONPATH=src);
# diffusers (for the benchmark's peer) is installed from wheels carried in wheels/ if present
# (`pip download diffusers==0.36.0 --no-deps -d wheels` on a machine with the registry).
# SECTIONS (default tests,bench,cifar,emoji64) picks sections: all four take up to ~19 minutes, more than one
# device command may run (10 minutes), so run emoji64 on its own:
#   .venv/bin/python benchmarks/pack_emoji64.py      # here, once: gpu-data/emoji64.npz (the emoji splits, ~19 MiB)
#   device tool: run(carry=["gpu-data"], timeout_s=560, command="SECTIONS=emoji64 bash benchmarks/gpu.sh")
#   bash benchmarks/gpu_fid.sh FILES_AT             # here, after: FID of its samples.npz and the floor
# emoji64 trains configs/emoji64.yaml for EMOJI64_MINUTES (default 4) and writes emoji64.txt/.json (images/s,
# peak CUDA memory), emoji64-grid.png and samples.npz (benchmarks/gpu_emoji64.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src
PY=${PYTHON:-python3}
SECTIONS=${SECTIONS:-tests,bench,cifar,emoji64}
for s in ${SECTIONS//,/ }; do
  case $s in tests|bench|cifar|emoji64) ;; *) echo "gpu.sh: unknown section $s in SECTIONS; use tests,bench,cifar,emoji64" >&2; exit 2;; esac
done
want() { [[ ",$SECTIONS," == *",$1,"* ]]; }
[ -d wheels ] && $PY -m pip install -q --no-deps wheels/*.whl
$PY - <<'PY' | tee "$OUT/machine.txt"
import torch; print(torch.__version__, torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported())
PY
# 1) the CUDA paths: bf16/fp16 autocast, auto, compile, NCCL through torchrun (tests/unit/test_cuda.py), plus the
#    precision and sampler tests on the GPU's host
want tests && timeout 240 $PY -m pytest -q -p no:cacheprovider tests/unit/test_cuda.py tests/unit/test_precision.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
# 2) the benchmark on the GPU, larger batches, no RSS / grid (host memory is not the question there)
want bench && { timeout 240 $PY benchmarks/run.py --device cuda --batch-sizes 128,256 --repeats 3 --skip-memory --skip-grid \
  --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1; tail -25 "$OUT/bench.txt"; }
# 3) a few hundred steps of the CIFAR-10 config on random data (the images' content does not change speed)
want cifar && timeout 120 $PY - <<'PY' 2>&1 | tail -5 | tee "$OUT/cifar.txt"
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
# 4) the Difflo system (configs/emoji64.yaml, 37.1M parameters, 64x64 RGB, 98 subcategories) for a fixed number of
#    minutes on the packed emoji train split; then a named-row grid and 490 class-balanced samples for FID
#    (computed back on a machine with the Inception weights: benchmarks/gpu_fid.sh)
MINUTES=${EMOJI64_MINUTES:-4}
if want emoji64; then
  [[ $MINUTES =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "gpu.sh: EMOJI64_MINUTES=$MINUTES must be a number of minutes" >&2; exit 2; }
  if [ -f gpu-data/emoji64.npz ]; then
    timeout "$($PY -c "print(int(float('$MINUTES') * 60 + 240))")" $PY benchmarks/gpu_emoji64.py \
      --data gpu-data/emoji64.npz --out "$OUT" --minutes "$MINUTES" --device cuda 2>&1 | tail -15 | tee "$OUT/emoji64.log"
  else
    echo "emoji64: gpu-data/emoji64.npz is missing; run benchmarks/pack_emoji64.py and carry gpu-data" | tee "$OUT/emoji64.log"
  fi
fi
