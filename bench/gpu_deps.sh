#!/usr/bin/env bash
# Builds .gpu_deps/ on this machine (it reaches PyPI): the packages bench/gpu_session.sh needs
# that the GPU machine's python3 lacks. That machine has torch, torchvision, pandas,
# matplotlib, psutil, pytest, transformers and peft, and no network; the peers (higher,
# torch_maml, TorchOpt with optree and graphviz) and tqdm and tabulate travel in .gpu_deps/,
# which gpu_session.sh puts on PYTHONPATH. optree is compiled: its wheel is taken for the GPU
# machine's Python (PYV, default 3.12) and x86-64 Linux, TorchOpt for that Python (its pure
# wheel there; its C extension does not load against current torch anyway); the rest are pure.
#   bash bench/gpu_deps.sh            # then name .gpu_deps in the device call's carry
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${PYV:-3.12}
DEST=.gpu_deps
WHEELS=$(mktemp -d)
trap 'rm -rf "$WHEELS"' EXIT
PINS_BINARY="optree==0.20.0 torchopt==0.7.3"
PINS_PURE="higher==0.2.1 torch_maml==1.0 graphviz==0.21 tqdm==4.70.1 tabulate==0.10.0"

python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" $PINS_BINARY
python3 -m pip download -q --no-deps -d "$WHEELS" $PINS_PURE

rm -rf "$DEST"
mkdir -p "$DEST"
for w in "$WHEELS"/*.whl; do
  python3 -m zipfile -e "$w" "$DEST"
done
# sdists (torch_maml): their package folder, which is all pure Python
for s in "$WHEELS"/*.tar.gz; do
  tmp=$(mktemp -d)
  tar -xzf "$s" -C "$tmp"
  for pkg in "$tmp"/*/*/__init__.py; do
    cp -r "$(dirname "$pkg")" "$DEST/"
  done
  rm -rf "$tmp"
done
du -sh "$DEST"
ls "$DEST"
