#!/usr/bin/env bash
# A GPU session in one or two commands (device time is scarce: 15 minutes, 10 per command):
#   1. the `gpu`-marked tests (SKIP_TESTS=1 to leave them out),
#   2. the resnet18-224 preset at STEPS (default every N: 100, 500, 1000; about 8 minutes by
#      the H200's figures), one timed meta-gradient per cell, appended to $OUT/resnet18-224/,
#   3. the 1-GPU meta-training figure of bench.scaling (SKIP_SCALING=1 to leave it out),
#   4. with GPT2_STEPS (e.g. 1,10,50,100): the gpt2-small preset, to $OUT/gpt2-small/,
#   5. with SPEED=1: fewshot-speed (meta-batch 32, every library, 12 rounds), to
#      $OUT/fewshot-speed/.
# The peers and tqdm/tabulate are not on that machine: `bash bench/gpu_deps.sh` here builds
# .gpu_deps/ (name it in the device call's carry); it goes on PYTHONPATH below.
# Every row is written under $OUT as soon as it exists, so a time-out still returns it.
# Split over two commands if one would run past its limit:
#   OUT=dir STEPS=100 bash bench/gpu_session.sh
#   OUT=dir STEPS=500,1000 SKIP_TESTS=1 SKIP_SCALING=1 bash bench/gpu_session.sh
# then copy dir/resnet18-224/runs.csv (both parts: --append keeps the other N) to results/.
set -u
OUT=${OUT:?set OUT to the output folder}
PY=${PY:-python3}
STEPS=${STEPS:-100,500,1000}
export PYTHONPATH="$PWD:$PWD/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
log() { echo "[$(($(date +%s) - start))s] $*" | tee -a "$OUT/log.txt"; }

{ nvidia-smi || true; $PY -c "import torch, torchvision; print(torch.__version__, \
torchvision.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"; } \
  > "$OUT/env.txt" 2>&1
if [ -z "${SKIP_TESTS:-}" ]; then
  log "gpu tests"
  timeout "${T_TESTS:-120}" $PY -m pytest -q -m gpu -p no:cacheprovider tests \
    > "$OUT/gpu-tests.txt" 2>&1
  log "gpu tests rc=$?"
fi
log "resnet18-224 N=$STEPS"
timeout "${T_PRESET:-540}" $PY -m bench --preset resnet18-224 --steps "$STEPS" --append \
  --out "$OUT" --no-report >> "$OUT/log.txt" 2>&1
log "preset rc=$?"
if [ -z "${SKIP_SCALING:-}" ]; then
  log "scaling"
  timeout "${T_SCALING:-50}" $PY -m bench.scaling --device cuda --procs 1 --iterations 4 \
    --out "$OUT/scaling" >> "$OUT/log.txt" 2>&1
  log "scaling rc=$?"
fi
if [ -n "${GPT2_STEPS:-}" ]; then
  log "gpt2-small N=$GPT2_STEPS"
  timeout "${T_GPT2:-300}" $PY -m bench --preset gpt2-small --steps "$GPT2_STEPS" --append \
    --out "$OUT" --no-report >> "$OUT/log.txt" 2>&1
  log "gpt2-small rc=$?"
fi
if [ -n "${SPEED:-}" ]; then
  log "fewshot-speed"
  timeout "${T_SPEED:-300}" $PY -m bench.fewshot_speed --rounds 12 --out "$OUT/fewshot-speed" \
    >> "$OUT/log.txt" 2>&1
  log "fewshot-speed rc=$?"
fi
