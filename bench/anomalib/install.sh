#!/usr/bin/env bash
# Install anomalib's PatchCore into its own venv (bench/anomalib/.venv, git-ignored) for
# bench/engine_vs_anomalib.py. torch/torchvision are NOT installed again: a .pth file puts the
# base venv's site-packages (patchq's, with the pinned torch==2.14.1 / torchvision==0.29.1 and
# the Lite0 weights package) after this venv's own, so pip sees the pins as satisfied and only
# adds what anomalib needs on top; the base venv is never modified.
#
#   bench/anomalib/install.sh [BASE_VENV]      (default: .venv of the repository)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
base="${1:-$here/../../.venv}"
venv="$here/.venv"
base_site="$("$base/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
python3 -m venv "$venv"
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$base_site" > "$site/patchq-base.pth"
"$venv/bin/python" -m pip install --quiet anomalib==2.7.0 'torch==2.14.1' 'torchvision==0.29.1'
"$venv/bin/python" -c 'import anomalib, torch; print("anomalib", anomalib.__version__, "torch", torch.__version__)'
