#!/usr/bin/env bash
# First the patch search alone on the GPU as the memory bank grows (10k, 100k and 1M synthetic
# 152-dim patches: build, ms/image, recall@1 against the exact search; bench/search_scaling.py),
# then images/s of one worker on one GPU, decode included: EfficientNet-Lite0 and Lite2, 224 px,
# bfloat16, memory bank on the GPU (faiss-gpu when installed, else patchq's exact torch search;
# bench/gpu_throughput.py). Runs in at most 8 minutes (90 s + 380 s); prints two tables.
#
#   bench/gpu_check.sh                 # on a machine with an NVIDIA GPU and `make install` done
#   PYTHON=/path/to/python bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
if [ ! -x "$python" ]; then
  echo "gpu_check: no Python at $python; run \`make install\` or set PYTHON=/path/to/python" >&2
  exit 2
fi
if ! "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); run this on a" \
       "machine with an NVIDIA GPU and a CUDA build of torch" >&2
  exit 2
fi
"$python" -c 'import torch; print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'
"$python" -c 'import faiss; print("faiss GPUs:", faiss.get_num_gpus(), "(0: torch search on the GPU)")'
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout --kill-after=10 90 "$python" -m bench.search_scaling --device cuda --threads "$(nproc)" \
  --sizes 10000 100000 1000000 --images 12
exec timeout --kill-after=10 380 "$python" -m bench.gpu_throughput --device cuda \
  --backbones efficientnet_lite0 efficientnet_lite2 --image-size 224 --images 3000 \
  --batch-size 64 "$@"
