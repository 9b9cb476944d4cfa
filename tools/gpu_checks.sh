#!/usr/bin/env bash
# The GPU checks and benchmarks in one command, for a machine with one CUDA GPU, sized to end
# inside a time budget (GPU_CHECKS_BUDGET_S below), so that a command with a time limit ends with its results.
#
#   bash tools/gpu_checks.sh OUT_DIR [STEP ...]     default: build kernel-tests kernels actor update push generate embedded
#
# build         the fused kernels, in place (python setup.py build_ext --inplace)
# kernel-tests  tests/ops/test_kernels_cuda.py: the kernels against fp64 references, odd shapes, TP combine
# kernels       tools/bench_kernels.py --preset headline: ours / pure torch / torch.compile / Liger (CSV + PNG)
# kernels-full  tools/bench_kernels.py over the whole grid (tokens 1k-32k, 3 vocabularies, TP 1/2/8, bf16 and fp32)
# actor         tests/actor/test_actor_gpu.py: bf16 log-prob parity with transformers, actor.offload on a GPU
# update        tools/bench_update.py at TP1: one DAPO update step, tokens/s and MFU; the actor.offload round trip
# push          tools/bench_push.py at TP1: actor -> embedded engine on the GPU, bf16
# generate      tools/bench_generate.py: embedded engine against transformers' generate (batch 64, 256 tokens)
# refill        tools/bench_refill.py: the embedded engine's refilled rows against chunked decoding (not in the default)
# embedded      tests/rollout/embedded/test_engine.py -k cuda: the embedded engine on the GPU against the CPU (bf16)
#
# Where GPU time is short, run every step in one command, in this order (most needed first): the steps that do not
# fit in the budget are skipped and said, and a second command gets only those, with what time is left. A second
# command on a fresh machine has no built extension: give it the build step again (without one, the actor's
# figures would be the pure-torch references': the summary says so, and update.csv's "ops" column).
# Budget: GPU_CHECKS_BUDGET_S seconds for all steps (default 560); each step is stopped at what is left of it
# (or at its own cap), and a step with less left than it needs to measure anything (20 s; 60-90 s for the builds,
# benchmarks and model steps) is skipped, so the command ends with its results
# (a timeout may overrun by the 10 s a stopped step is given to exit). A failed, stopped or skipped step
# makes the exit status 1.
# Wheels: a folder .whl in the repository (megatron-core, liger-kernel; `bash tools/gpu_wheels.sh` fetches
# them on a machine with PyPI, for a GPU machine without network access) is installed into /tmp/site first.
# .whl is git-ignored: copy it along with the checkout to the GPU machine. Without megatron-core the steps that need it
# (actor, update, push) are skipped at once, said in the summary, instead of failing one by one.
# Results: every log, CSV and PNG go into OUT_DIR/gpu_checks.tgz, rewritten after each step (so a command
# cut off still returns what finished), and OUT_DIR/summary.txt; the summary is also printed last. A step running
# when the command was cut off is "running" there, and those after it are "not reached". On a machine where torch
# sees no CUDA device every step is skipped and said (on the CPU they would only measure the CPU).
set -uo pipefail
out=${1:?usage: bash tools/gpu_checks.sh OUT_DIR [STEP ...]}
shift
steps=${*:-build kernel-tests kernels actor update push generate embedded}
known="build kernel-tests kernels kernels-full actor update push generate refill embedded"
for name in $steps; do  # every name checked before anything runs: a misspelt step costs no GPU time
  [[ " $known " == *" $name "* ]] || { echo "unknown step $name ($known)"; exit 2; }
done
budget=${GPU_CHECKS_BUDGET_S:-560}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 2  # the paths below are the repository's
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_checks.XXXXXX")
trap 'rm -rf "$work"' EXIT  # everything of it is in OUT_DIR/gpu_checks.tgz
started=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MAX_JOBS=${MAX_JOBS:-$(nproc)}
# The extension for this GPU alone: an image's own list of architectures would compile it once per entry.
arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null) &&
  export TORCH_CUDA_ARCH_LIST=$arch

if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$work/wheels.log" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site" || echo "!! wheels did not install, see wheels.log"
fi
# What the machine has, in one interpreter (each import of torch costs seconds of the budget). A module that does not
# import is named with the consequence; its traceback goes to imports.log.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$work/device.txt" 2>&1
echo "ninja: $(command -v ninja || echo 'not found: the kernels compile one source at a time')" >>"$work/device.txt"
python3 - >>"$work/device.txt" 2>"$work/imports.log" <<'EOF'
import importlib, sys, traceback
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
CONSEQUENCE = {"megatron.core": "actor, update and push are skipped (copy .whl along, see tools/gpu_wheels.sh)",
               "transformers": "the model steps fail", "liger_kernel": "the kernel benchmark has no Liger rows",
               "pytest": "the test steps fail", "yaml": "the package's config does not load",
               "matplotlib": "the benchmarks write no charts"}
for name, consequence in CONSEQUENCE.items():
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "(no version)"))
    except Exception:
        traceback.print_exc()
        print(f"!! {name} does not import (imports.log): {consequence}")
EOF
[ $? -eq 0 ] || echo "!! the package probe itself failed (imports.log): the steps may fail" >>"$work/device.txt"
cat "$work/device.txt"
megatron=no  # by the probe's line naming its version: a probe that died prints none
grep -q '^megatron.core [0-9]' "$work/device.txt" && megatron=yes
gpu=yes
grep -q '^cuda device: none$' "$work/device.txt" && gpu=no && echo "!! torch sees no CUDA device: every step is skipped"

built=yes  # until the build step says otherwise
if [[ " $steps " != *" build "* ]]; then  # an earlier command's build, if this machine still has it
  python3 -c "from megatron_dapo.ops import extension as e; assert e.EXTENSION is not None, e.UNAVAILABLE_BECAUSE" \
    >"$work/extension.log" 2>&1 || {
    built=no
    echo "!! no built extension here (extension.log) and no build step: the kernel steps are skipped, and the actor's figures are the pure-torch references'"
  }
fi
summary=("step          result   time")
pending=($steps)  # not yet done: "running" (the first, while it runs) and "not reached" in the summary
pack() {  # everything so far into one archive and the summary, so that a cut-off command still returns them
  local rest=() name first=${1:-}
  for name in "${pending[@]}"; do
    if [ -n "$first" ]; then
      rest+=("$(printf '%-13s %-8s %5s s' "$name" running -)")
      first=
    else
      rest+=("$(printf '%-13s %-8s %5s s' "$name" "not reached" -)")
    fi
  done
  printf '%s\n' "${summary[@]}" ${rest[@]+"${rest[@]}"} >"$out/summary.txt"
  cp "$out/summary.txt" "$work/summary.txt"
  tar czf "$out/gpu_checks.tgz.tmp" -C "$work" . && mv "$out/gpu_checks.tgz.tmp" "$out/gpu_checks.tgz"
}
step() {  # step NAME CAP_S COMMAND...: run with the lesser of CAP_S and the budget left, output to NAME.log
  local name=$1 cap=$2
  shift 2
  pending=("${pending[@]:1}")  # this step's line goes into the summary below, whatever becomes of it
  if [ "$gpu" = no ]; then
    [ "$name" = build ] && built=no
    summary+=("$(printf '%-13s %-8s %5s s  (no CUDA device)' "$name" skipped -)")
    pack
    return
  fi
  case $name in
    actor|update|push) if [ "$megatron" = no ]; then
        summary+=("$(printf '%-13s %-8s %5s s  (no megatron-core)' "$name" skipped -)")
        pack
        return
      fi ;;
    kernel-tests|kernels|kernels-full) if [ "$built" = no ]; then  # the time goes to the later steps instead
        summary+=("$(printf '%-13s %-8s %5s s  (no built extension)' "$name" skipped -)")
        pack
        return
      fi ;;
  esac
  local left=$((budget - (SECONDS - started)))
  local limit=$((cap < left ? cap : left)) least=20
  # What a step takes before it measures anything (a model saved and loaded, NCCL started, an extension built):
  # started with less, it could only time out.
  case $name in build|actor|update|push|generate) least=90 ;; kernels|kernels-full|refill) least=60 ;; esac
  if [ "$limit" -lt "$least" ]; then
    [ "$name" = build ] && built=no  # the kernel steps after it are skipped, the actor's figures said to be references'
    summary+=("$(printf '%-13s %-8s %5s s  (budget spent)' "$name" skipped -)")
    pack
    return
  fi
  pending=("$name" ${pending[@]+"${pending[@]}"})
  pack running  # a command cut off in this step says so
  pending=("${pending[@]:1}")
  echo "== $name (limit ${limit} s): $*"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >"$work/$name.log" 2>&1
  rc=$?
  local result=ok
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && result=timeout
  [ $rc -ne 0 ] && [ $result = ok ] && result="failed($rc)"
  # pytest passes with every test skipped (no CUDA, an extension that did not load): no GPU check was done
  local tally note=""
  tally=$(grep -E '[0-9]+ (passed|failed|skipped|deselected)' "$work/$name.log" | tail -n 1)
  if [ $result = ok ] && [[ $tally =~ ([0-9]+)\ skipped ]]; then
    note="  (${BASH_REMATCH[1]} skipped: see -rs in $name.log)"
    [[ $tally =~ [0-9]+\ (passed|xpassed|xfailed) ]] || result=skipped
  fi
  tail -n 4 "$work/$name.log"
  [ "$name" = build ] && [ $result != ok ] && built=no
  case $name in actor|update) [ "$built" = no ] && note="$note  (pure-torch references: no extension)" ;; esac
  summary+=("$(printf '%-13s %-8s %5s s%s' "$name" "$result" $((SECONDS - t0)) "$note")")
  pack
}

# One rank without torchrun: its workers run in a session of their own, which the step's timeout would not reach.
one_rank=(RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1
          MASTER_PORT=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"))
for name in $steps; do
  case $name in
    build) step build 300 bash -c 'python3 setup.py build_ext --inplace && python3 -c "
from megatron_dapo.ops import extension as e
assert e.EXTENSION is not None, e.UNAVAILABLE_BECAUSE  # else every kernel test would skip, and pass
print(e.describe())"' ;;
    kernel-tests) step kernel-tests 120 env MEGATRON_DAPO_REQUIRE=gpu,extension python3 -m pytest -q -rs \
      tests/ops/test_kernels_cuda.py ;;
    kernels) step kernels 240 python3 tools/bench_kernels.py --preset headline --out "$work" ;;
    kernels-full) step kernels-full 600 python3 tools/bench_kernels.py --out "$work" --name kernels_full ;;
    actor) step actor 180 env MEGATRON_DAPO_REQUIRE=gpu python3 -m pytest -q -rs -s tests/actor/test_actor_gpu.py ;;  # -s: the errors it prints
    update) step update 150 env "${one_rank[@]}" python3 tools/bench_update.py --tp 1 --out "$work" ;;
    push) step push 120 env "${one_rank[@]}" python3 tools/bench_push.py --tp 1 --out "$work" ;;
    generate) step generate 120 python3 tools/bench_generate.py --out "$work" ;;
    refill) step refill 120 python3 tools/bench_refill.py --prompts 64 --n 4 --max-batch-size 64 --new-tokens 256 \
      --stop-ids 1200 --repeats 1 --out "$work" ;;
    embedded) step embedded 120 env MEGATRON_DAPO_REQUIRE=gpu python3 -m pytest -q -rs \
      tests/rollout/embedded/test_engine.py -k cuda ;;
  esac
done
pack
echo "== summary ($((SECONDS - started)) s of $budget; logs and CSVs in $out/gpu_checks.tgz)"
printf '%s\n' "${summary[@]}"
awk 'NR > 1 && $2 != "ok" { bad = 1 } END { exit bad }' "$out/summary.txt"  # the result column only
