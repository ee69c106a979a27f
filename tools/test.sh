#!/usr/bin/env bash
# Set up (idempotently) and run every check; this is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export FIFTYONE_DO_NOT_TRACK=true PIP_DISABLE_PIP_VERSION_CHECK=1

step() { printf '\n=== %s\n' "$*"; }

step "environment (.venv)"
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch/torchvision pinned to the builds this machine kind has on disk; the package itself asks only torch>=2.1.
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 -e ".[dev,cuda13]"
if ! command -v chromium >/dev/null 2>&1; then
  step "installing Chromium for the JupyterLab browser test"
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

step "notebooks, library and README in step"
.venv/bin/nbdev_export
.venv/bin/nbdev_clean
.venv/bin/python tools/make_readme.py
if [ -n "$(git status --porcelain -- detlearn nbs README.md)" ]; then
  git status --short -- detlearn nbs README.md
  echo "FAILED: nbdev_export / nbdev_clean / tools/make_readme.py changed the files above; run them and commit." >&2
  exit 1
fi

step "pytest: every notebook through nbdev's test engine, then tests/"
# Two xdist workers on two cores: one math thread each, or torch's threads fight and everything crawls.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
.venv/bin/python -m pytest -q -n 2 --dist loadgroup tests "$@"

step "the other CPU path: equivalence checks and precision-sensitive chapters again"
# On an AVX-512 CPU, run them as an AVX2 CPU without bf16 would (the path the official fixtures were made on);
# on an AVX2 CPU, force the CPU bf16 path on (emulated) so that the bf16 branch is checked too.
if .venv/bin/python -c "import sys, torch; sys.exit(torch.backends.cpu.get_cpu_capability() != 'AVX512')"; then
  other=(env ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2); echo "this CPU: AVX-512; second pass on the AVX2 path (bf16 off)"
else
  other=(env DETLEARN_CPU_BF16=1); echo "this CPU: AVX2; second pass with the CPU bf16 path forced on"
fi
"${other[@]}" .venv/bin/python -m pytest -q -n 2 --dist loadgroup tests/test_dino_official.py tests/test_dfine_official.py \
  tests/test_swin_official.py tests/test_dfine_backbone.py tests/test_detr_loss.py tests/test_dfine_loss.py \
  tests/test_yolox_model.py tests/test_export.py "tests/test_notebooks.py::test_notebook[00b_testing.ipynb]" \
  "tests/test_notebooks.py::test_notebook[43c_models_dfine_family.ipynb]" \
  "tests/test_notebooks.py::test_notebook[50_train_utils.ipynb]" "tests/test_notebooks.py::test_notebook[57_bench.ipynb]"
