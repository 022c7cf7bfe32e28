#!/usr/bin/env bash
# The whole GPU session in one command (device time is scarce, about 10 minutes):
#   1. the `gpu`-marked tests,
#   2. the memory floor: resnet18-224 at N=500 and 1000 with offload and revolve (8 slots),
#   3. agreement and timing at N=100, where naive still fits, with the other strategies,
#   4. the 1-GPU meta-training figure of bench.scaling.
# Each result is written under $OUT as soon as it exists, so a time-out still returns it.
# usage (on the GPU machine): OUT=/some/dir bash bench/gpu_session.sh
set -u
OUT=${OUT:?set OUT to the output folder}
PY=${PY:-python3}
PRESET=${PRESET:-resnet18-224}
FLOOR_STEPS=${FLOOR_STEPS:-500,1000}
AGREE_STEPS=${AGREE_STEPS:-100}
export PYTHONPATH="$PWD:$PWD/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
log() { echo "[$(($(date +%s) - start))s] $*" | tee -a "$OUT/log.txt"; }

{ nvidia-smi || true; $PY -c "import torch, torchvision; print(torch.__version__, \
torchvision.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"; } \
  > "$OUT/env.txt" 2>&1
log "gpu tests"
timeout "${T_TESTS:-80}" $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_resnet.py \
  > "$OUT/gpu-tests.txt" 2>&1
log "gpu tests rc=$?"
log "memory floor N=$FLOOR_STEPS"
timeout "${T_FLOOR:-240}" $PY -m bench --preset "$PRESET" --steps "$FLOOR_STEPS" \
  --strategies offload,revolve_s8 --out "$OUT/floor" --no-report >> "$OUT/log.txt" 2>&1
log "floor rc=$?"
log "agreement N=$AGREE_STEPS"
timeout "${T_AGREE:-200}" $PY -m bench --preset "$PRESET" --steps "$AGREE_STEPS" \
  --strategies naive,naive_rerun,first_order,checkpoint_auto_step,revolve_s4,offload,implicit,torch_maml_checkpoint \
  --out "$OUT/agree" --no-report >> "$OUT/log.txt" 2>&1
log "agree rc=$?"
log "scaling"
timeout "${T_SCALING:-50}" $PY -m bench.scaling --device "${SCALING_DEVICE:-cuda}" --procs 1 \
  --iterations 4 --out "$OUT/scaling" >> "$OUT/log.txt" 2>&1
log "scaling rc=$?"
