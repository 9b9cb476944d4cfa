#!/usr/bin/env bash
# Fetch the Python packages that tools/gpu_checks.sh needs beyond a CUDA machine's usual set (torch,
# transformers, triton) into .whl/, as wheels for Python 3.12 on x86-64, for a GPU machine without
# network access. Run it where PyPI is reachable and send .whl with the repository; gpu_checks.sh
# installs them into /tmp/site.
#
#   bash tools/gpu_wheels.sh       megatron-core 0.16.1 (needs torch, numpy, packaging) and liger-kernel 0.8.5
#                                  (needs torch, triton; the GRPO loss API that bench_kernels calls), 3.5 MB
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
fetched=$(mktemp -d)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$fetched" "megatron-core==0.16.1" "liger-kernel==0.8.5" >.whl/download.log 2>&1; then
  grep -v "is ignored" .whl/download.log >&2
  echo "gpu_wheels: pip download failed (above)" >&2
  exit 1
fi
rm -f .whl/*.whl  # an older version left beside the new one would make the install refuse both
mv "$fetched"/*.whl .whl/ && rmdir "$fetched"
ls -l .whl/*.whl
