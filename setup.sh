#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with the CPU build of torch, bonsai-quant and its test
# tools (real MLX on CPU, gemlite's source for its packing oracle), then a first conversion of the built-in
# tiny model so you can see the whole pipeline work.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements-cpu.txt -e ".[test]"
# gemlite imports CUDA at import time; the tests only use its pure-torch bit packer, so no deps are needed.
.venv/bin/python -m pip install --quiet --no-deps gemlite==0.6.0.post2
# The Mac applications the consumer tests load our packs with. Their Linux pins want CUDA builds of mlx, so
# they go in without dependencies beside mlx[cpu]; what they import besides is in the test extra.
.venv/bin/python -m pip install --quiet --no-deps mlx-vlm==0.7.10 mflux==0.24.0
if [ "${1:-}" != "--no-convert" ]; then
  .venv/bin/bonsai-quant convert --mode ternary --out out/flux2-tiny-digits-ternary --force
fi
