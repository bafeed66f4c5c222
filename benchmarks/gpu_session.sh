#!/bin/bash
# GPU measurements of the pipeline reshaping (issue 10) and allocation (issue 11), one device call.
# Usage: bash benchmarks/gpu_session.sh OUTDIR [stages...]
#   stages: env compress7b spectrum7b sens7b recalloc shared tests
set -u
OUT=${1:?outdir}; shift
STAGES=${*:-"env compress7b spectrum7b tests"}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
mkdir -p "$OUT" "$TRITON_CACHE_DIR"
for s in $STAGES; do
  echo "=== stage $s $(date +%T)"
  case $s in
    env) python3 -c "import torch, transformers, accelerate, huggingface_hub as h; print(torch.__version__, transformers.__version__, accelerate.__version__, h.__version__, torch.cuda.get_device_name())"
         nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1 ;;
    compress7b) timeout 260 python3 benchmarks/gpu_compress_7b.py --layers 32 --samples 256 --seq-len 2048 \
                  --keep 0.8 --method whiten --solver exact --batch-size 8 --json "$OUT/gpu_compress_7b.json" 2>&1 | tail -22 ;;
    spectrum7b) timeout 280 python3 benchmarks/gpu_compress_7b.py --layers 32 --samples 256 --seq-len 2048 \
                  --keep 0.8 --method whiten --solver exact --batch-size 8 --allocation spectrum \
                  --json "$OUT/gpu_compress_7b_spectrum.json" 2>&1 | tail -22 ;;
    sens7b) timeout ${SENS_LIMIT:-300} python3 benchmarks/gpu_sensitivity_7b.py --output "$OUT/sens7b" \
              --json "$OUT/gpu_sensitivity_7b.json" 2> "$OUT/sens7b.log" | tail -20
            tr '\r' '\n' < "$OUT/sens7b.log" | grep -v '^$' | awk 'NR%20==0' | tail -30
            python3 -c "import json; d=json.load(open('$OUT/sens7b/sensitivity.json')); print('targets done', len(d['curves']))" ;;
    recalloc) timeout ${REC_LIMIT:-400} python3 benchmarks/recover_bench.py --data .carry/data --device cuda --jobs 2 \
              --keep 0.6 --modes factors+zero factors+residual --lr 1e-3 --distill 1 --work /tmp/recalloc \
              --compress-args "--allocation sensitivity --sensitivity .carry/sens" \
              --json "$OUT/recover_h200_allocated_0.6.json" 2>&1 | tail -12 ;;
    shared) timeout ${SHARED_LIMIT:-300} python3 benchmarks/shared_decode_bench.py --json "$OUT/decode_shared_llama2-7b_keep0.5.json" 2>&1 | grep -v Warn | tail -12 ;;
    dcom) timeout ${DCOM_SOLVER_LIMIT:-220} python3 benchmarks/dcom_solver_study.py --budget-s ${DCOM_BUDGET:-170} --json "$OUT/dcom_solver_study.json" --png "$OUT/dcom_solvers.png" 2>&1 | grep -v Warn | tail -25
          timeout ${DCOM_COST_LIMIT:-220} python3 benchmarks/dcom_cost.py --budget-s ${DCOM_BUDGET:-170} --json "$OUT/dcom_cost.json" 2>&1 | grep -v Warn | tail -12 ;;
    tests) timeout ${TESTS_LIMIT:-200} python3 -m pytest -q -m gpu ${TESTS:-tests/} -x -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt" ;;
  esac
done
ls -la "$OUT"
