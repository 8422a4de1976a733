#!/usr/bin/env bash
# Everything that needs a GPU, in one device-tool run: a drawn task gets 15 minutes of device time in all, and a
# machine start costs one or two of them, so the checks are prepared here and run there in one command.
#
#   bash bench/gpu_session.sh prepare    # here, in the test venv (it has the `adapters` library): writes the
#                                        # git-ignored .oracles/bert and .bench-templates/ the GPU run reads
#   bash bench/gpu_session.sh run        # there: device tool `run`, carry [".oracles", ".bench-templates"],
#                                        # timeout_s 600; results come back under $OUT
#
# The run: nvidia-smi and versions (env.txt); the kernel tests compiled, every dtype (tests/kernels, the
# `gpu`-marked ones included: serving shapes, the decode step in a CUDA graph; kernel-tests.log); bench/kernels.py
# (kernels.md); bench/forward_gpu.py run (forward-gpu.md). Each step has its own time limit, so one that hangs
# leaves the others their time; the exit status counts the steps that failed. The GPU machines have torch,
# triton, transformers, safetensors and pytest, and nothing of ours is installed there: the repository root on
# PYTHONPATH is enough (no gRPC stubs are needed).
set -uo pipefail
cd "$(dirname "$0")/.."

prepare() {
    local python=${PYTHON:-.venv/bin/python}
    ADAPTERSERVE_ORACLE_DIR="$PWD/.oracles" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 "$python" -c '
import sys, tempfile
from pathlib import Path
sys.path.insert(0, "tests")
from oracle import build_oracle
with tempfile.TemporaryDirectory() as tmp:
    build_oracle("bert", Path(tmp) / "bert", peft=True)  # stores .oracles/bert (the GPU tests read only bert)
' || return 1
    OMP_NUM_THREADS=1 "$python" bench/forward_gpu.py templates || return 1
    du -sh .oracles .bench-templates
}

failed=0
step() {  # step NAME SECONDS COMMAND...: runs it, its output in $OUT/NAME.log, and says how it ended
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $SECONDS s in all" | tee -a "$OUT/steps.txt"
    tail -n 3 "$OUT/$name.log"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

run() {
    : "${OUT:?run this through the device tool, which sets OUT}"
    [ -d .oracles/bert ] && [ -d .bench-templates ] || { echo "carry .oracles and .bench-templates"; return 1; }
    export PYTHONPATH="$PWD" ADAPTERSERVE_ORACLE_DIR="$PWD/.oracles" HF_HUB_OFFLINE=1
    { nvidia-smi; python3 -c 'import torch, triton, transformers, sys
print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
print("triton", triton.__version__, "transformers", transformers.__version__)'; } > "$OUT/env.txt" 2>&1
    # 240 + 100 + 120 s at most: with the start, well inside the tool's 600 s per command; each result is copied
    # as soon as its step ends, so a cut-off run still brings back what it finished
    step kernel-tests 240 python3 -m pytest -q -p no:cacheprovider --maxfail=20 --durations=10 tests/kernels
    step kernels 100 python3 bench/kernels.py
    cp bench/results/kernels.md "$OUT/" 2>/dev/null
    step forward-gpu 120 python3 bench/forward_gpu.py run
    cp bench/results/forward-gpu.md "$OUT/" 2>/dev/null
    ls -l "$OUT"
    return "$failed"  # the number of steps that failed
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: bash bench/gpu_session.sh prepare|run" >&2; exit 2 ;;
esac
