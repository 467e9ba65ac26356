#!/usr/bin/env bash
# The CUDA engine on a GPU machine, in one command.
#
#   scripts/gpu-check.sh build   # here (any machine with the Rust toolchain):
#                                # builds the CUDA test binary and phalanx-bench
#                                # with --features cuda into target/gpu/
#   scripts/gpu-check.sh run     # on the GPU machine (no toolchain needed):
#                                # runs the tests (bit-for-bit against the scalar
#                                # reference) and the kernel benchmark; figures in
#                                # ${OUT:-target/gpu}/cuda.json
#   scripts/gpu-check.sh         # both, on a GPU machine with the toolchain
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}
out=${OUT:-target/gpu}
mkdir -p target/gpu "$out"

if [[ $mode == build || $mode == all ]]; then
  cargo build --release --locked -p phalanx-benches --features cuda --bin phalanx-bench
  bin=$(cargo test --release --locked -p phalanx-compute --features cuda --test cuda --no-run \
        --message-format=json 2>/dev/null \
        | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
  cp "$bin" target/gpu/cuda-tests
  cp target/release/phalanx-bench target/gpu/phalanx-bench
  # Small enough to carry to the GPU machine.
  strip target/gpu/cuda-tests target/gpu/phalanx-bench 2>/dev/null || true
  echo "built target/gpu/cuda-tests and target/gpu/phalanx-bench"
fi

if [[ $mode == run || $mode == all ]]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  target/gpu/cuda-tests --nocapture --test-threads 1 2>&1 | tee "$out/cuda-tests.txt"
  if grep -q "skipped" "$out/cuda-tests.txt"; then
    echo "the CUDA tests were skipped: no usable GPU here" >&2
    exit 1
  fi
  target/gpu/phalanx-bench cuda --json "$out/cuda.json"
fi
