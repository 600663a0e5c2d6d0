#!/usr/bin/env bash
# Create (or reuse) a virtual environment with visprune and its dev tools installed. Safe to run repeatedly.
#   bash scripts/setup.sh            -> .venv: the newest torch / transformers inside pyproject's tested range
#   bash scripts/setup.sh --oldest   -> .venv-oldest: transformers pinned to the range's lower bound
#   bash scripts/setup.sh --lmms     -> .venv-lmms: the lmms extra (lmms-eval) for the plugin tests (tests/lmms)
# .venv-oldest and .venv-lmms are layered on .venv (made first if missing): they see its packages after their
# own, so they share its torch (0.75 GB each) and hold only what differs; what they install shadows .venv's.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
extras="dev"
extra=()
if [ "${1:-}" = "--lmms" ]; then
  venv=.venv-lmms
  extras="dev,lmms"
elif [ "${1:-}" = "--oldest" ]; then
  venv=.venv-oldest
  # The lower bound of the declared range, read from pyproject.toml (one source of truth).
  oldest=$(sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
  [ -n "$oldest" ] || { echo "setup.sh: no 'transformers>=X,<Y' range in pyproject.toml" >&2; exit 1; }
  extra=("transformers==$oldest")
elif [ -n "${1:-}" ]; then
  echo "usage: bash scripts/setup.sh [--oldest | --lmms]" >&2
  exit 2
fi
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ "$venv" != .venv ]; then
  [ -x .venv/bin/python ] || bash scripts/setup.sh
  site_of() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))'; }
  # addsitedir appends .venv's site-packages (and runs its .pth files) after this venv's own; the name sorts last.
  echo "import site; site.addsitedir('$(site_of .venv)')" > "$(site_of "$venv")/zz-visprune-base-venv.pth"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
# CPU build of torch (the pinned wheel is available offline on the project's machines).
"$venv/bin/python" -m pip install --quiet "torch==2.13.0"
# torch stays at that file (named again so that no dependency's pin can swap in a CUDA build).
"$venv/bin/python" -m pip install --quiet -e ".[$extras]" "torch==2.13.0" "${extra[@]}"
if [ "$venv" = .venv-lmms ]; then
  # lmms-eval requires torchvision, whose PyPI wheels do not load beside this CPU build of torch ("operator
  # torchvision::nms does not exist"), and nothing the plugin runs imports it (transformers works without it):
  # it is removed, so `pip check` names it as lmms-eval's (and timm's) one missing requirement.
  "$venv/bin/python" -m pip uninstall --quiet --yes torchvision
  "$venv/bin/python" -c "import lmms_eval.evaluator, importlib.metadata as m; print(f'$venv: lmms-eval {m.version(\"lmms-eval\")}')"
fi
"$venv/bin/python" -c "import torch, transformers; print(f'$venv: torch {torch.__version__}, transformers {transformers.__version__}')"
