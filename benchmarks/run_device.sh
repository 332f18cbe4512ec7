#!/usr/bin/env bash
# One device call: GPU tests, the experts benchmark, and a short GPU recipe comparison.
# Usage (on the device, repo root, torchao wheel carried in .whl/):  bash benchmarks/run_device.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
python3 -m pip install -q --no-deps --no-build-isolation -e . > $OUT/pip.log 2>&1 || cat $OUT/pip.log
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
STAGES=${STAGES:-"tests bench compare"}
if [[ $STAGES == *tests* ]]; then
  timeout ${TESTS_S:-150} python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -25 | tee $OUT/gpu_tests.log
fi
if [[ $STAGES == *bench* ]]; then
  timeout ${BENCH_S:-330} python3 benchmarks/experts.py --out $OUT 2>&1 | tee $OUT/experts_stdout.log | grep -v '^{' 
fi
if [[ $STAGES == *compare* ]]; then
  timeout ${COMPARE_S:-200} python3 -m moeq.app.cli compare --out-dir $OUT/compare --no-progress --dim 512 --layers 6 --heads 8 \
    --experts 8 --expert-hidden 1024 --top-k 2 --batch-size 16 --seq-len 512 --steps ${COMPARE_STEPS:-300} --lr 1e-3 \
    2>&1 | tail -12 | tee $OUT/compare.log
fi
