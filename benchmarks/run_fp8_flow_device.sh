#!/usr/bin/env bash
# One device call for the FP8 dataflow block: its GPU tests, then benchmarks/moe_layer.py with
# the dataflow variants beside today's FP8 block and BF16 (timings, kernel-time breakdown,
# stage times, peak memory, bytes kept for backward, errors vs float64; JSON stamped with the
# git commit, date and device).
# Usage (repo root, one H100 or H200):  bash benchmarks/run_fp8_flow_device.sh           (< 8 min)
#                                       QUICK=1 bash benchmarks/run_fp8_flow_device.sh   (~3 min)
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p $OUT
python3 -m pip install -q --no-deps --no-build-isolation -e . > $OUT/pip.log 2>&1 || cat $OUT/pip.log
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
timeout ${TESTS_S:-170} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp8_flow.py \
  tests/test_fp8_hopper.py::test_gpu_routed_block 2>&1 | tail -25 | tee $OUT/gpu_tests_fp8_flow.log
BASE=("bf16 grouped_mm (3 GEMMs)" "moeq bf16" "moeq fp8 today's block" "moeq fp8 flow (rule's precisions)"
      "moeq fp8 flow all-FP8" "moeq fp8 flow, weights cached (micro-batch 2..N)")
if [[ -n ${QUICK:-} ]]; then
  SHAPES=(qwen3_30b_a3b qwen3_ep8_local); VARIANTS=("${BASE[@]}"); BENCH_S=${BENCH_S:-130}
else
  SHAPES=(qwen3_30b_a3b qwen3_ep8_local dsv3_ep8_local mixtral_8x7b)
  VARIANTS=("${BASE[@]}" "moeq fp8 flow wgrads in BF16" "moeq fp8 flow wgrad_down in BF16"); BENCH_S=${BENCH_S:-330}
fi
timeout $BENCH_S python3 benchmarks/moe_layer.py --shapes "${SHAPES[@]}" --variants "${VARIANTS[@]}" --out $OUT \
  2>&1 | tee $OUT/moe_layer_fp8_flow_stdout.log | grep -v '^{'
