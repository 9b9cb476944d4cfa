#!/usr/bin/env bash
# The GPU acceptance checks and benchmarks in one command, for a machine with one CUDA GPU.
#
#   bash tools/gpu_checks.sh OUT_DIR [STEP ...]      steps: build tests kernels push generate update (default: all)
#
# build     the fused kernels, in place (python setup.py build_ext --inplace)
# tests     the GPU tests: kernels against fp64 references (tests/ops), the actor's bf16 log-prob parity
#           on one GPU (tests/actor/test_actor_gpu.py), the embedded engine on CUDA (tests/rollout/embedded)
# kernels   tools/bench_kernels.py: ours / pure torch / torch.compile / Liger, CSV + PNG
# push      tools/bench_push.py at TP1: actor -> embedded engine on the GPU, bf16
# generate  tools/bench_generate.py: embedded engine against transformers' generate (batch 64, 256 tokens)
# update    tools/bench_update.py at TP1: one DAPO update step, tokens/s and MFU; the actor.offload round trip
#
# Logs and CSVs go to OUT_DIR; copy the CSV rows into benchmarks/results and the figures, with the
# device, into docs/performance.md. megatron-core must be importable (tests, push, update).
set -uo pipefail
out=${1:?usage: bash tools/gpu_checks.sh OUT_DIR [STEP ...]}
shift
steps=${*:-build tests kernels push generate update}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
run() {  # run NAME COMMAND...: the command's output to OUT_DIR/NAME.log; a failure is reported, the rest still runs
  local name=$1
  shift
  echo "== $name: $*"
  "$@" >"$out/$name.log" 2>&1 || { echo "!! $name failed (exit $?), see $out/$name.log"; status=1; }
  tail -n 5 "$out/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
for step in $steps; do
  case $step in
    build) run build python3 setup.py build_ext --inplace ;;
    tests) run tests python3 -m pytest -q -rs tests/ops tests/actor/test_actor_gpu.py tests/rollout/embedded ;;
    kernels) run kernels python3 tools/bench_kernels.py --out "$out" ;;
    push) run push torchrun --nproc-per-node 1 tools/bench_push.py --tp 1 --out "$out" ;;
    generate) run generate python3 tools/bench_generate.py --out "$out" ;;
    update) run update torchrun --nproc-per-node 1 tools/bench_update.py --tp 1 --out "$out" ;;
    *) echo "unknown step $step (build tests kernels push generate update)"; exit 2 ;;
  esac
done
exit $status
