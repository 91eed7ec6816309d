#!/usr/bin/env bash
# The bundled demo model in one command: stage 1 + 2a + 2b (train_demo.py's defaults), then stage 2c's three
# rounds on the trunk's own greedy generations (training/README.md), then the evaluation.
#   bash training/make_demo.sh [WORK_DIR] [OUT]     (default: a fresh temp dir; OUT = mlxmtp/demo_model)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-$(mktemp -d)}
OUT=${2:-mlxmtp/demo_model}
G=(--long-rounds 1 --long-gen-tokens 25600 --head-gen-temperature 0)
python training/train_demo.py --out "$W/demo_2b" --head-work "$W/work-2b"
python training/train_demo.py --long-from "$W/demo_2b" --out "$W/r1" --seed 2 --head-work "$W/work-r1" "${G[@]}"
python training/train_demo.py --long-from "$W/r1" --out "$W/r2" --seed 3 --head-work "$W/work-r2" "${G[@]}"
python training/train_demo.py --long-from "$W/r2" --out "$OUT" --seed 4 --head-lr 5e-4 --head-work "$W/work-r3" "${G[@]}"
python training/train_demo.py --eval-only --out "$OUT"
