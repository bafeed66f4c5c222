#!/bin/bash
# GPU measurements of issue #15 (decode attention, generate, batch table), in as few device calls as possible.
# Usage: bash benchmarks/gpu_decode_session.sh OUTDIR [stages...]
#   stages: attn decode05 decode05noglu decode02 decode02gluall decode08 llama3 cublas05 sdpa fold05 foldab generate batch05 batch08 profile sweep layer1 tests
set -u
OUT=${1:?outdir}; shift
STAGES=${*:-"attn decode05 generate tests"}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
mkdir -p "$OUT" "$TRITON_CACHE_DIR" ../shared
[ -e ../shared/data ] || ln -sfn "$PWD/.carry/data" ../shared/data
B="python3 -m rankcut bench"
L2=random:llama2-7b L3=random:llama3-8b
for s in $STAGES; do
  echo "=== stage $s $(date +%T)"
  case $s in
    attn) timeout ${ATTN_LIMIT:-150} python3 benchmarks/attention_bench.py --json "$OUT/attention_bench.json" 2>&1 | grep -v Warn | tail -30 ;;
    decode05) timeout 120 $B $L2 --random-lowrank 0.5 --compare $L2 --quiet --json "$OUT/decode_llama2-7b_keep0.5.json" 2>&1 | tail -6 ;;
    decode05noglu) RANKCUT_GLU=0 timeout 120 $B $L2 --random-lowrank 0.5 --compare $L2 --quiet --json "$OUT/decode_llama2-7b_keep0.5_noglu.json" 2>&1 | tail -6 ;;
    decode02) timeout 120 $B $L2 --random-lowrank 0.2 --compare $L2 --quiet --json "$OUT/decode_llama2-7b_keep0.2.json" 2>&1 | tail -6 ;;
    # decode02gluall: measured at f032f05, where RANKCUT_GLU=all also fused SiLU·up into low-rank phase 2 (since removed)
    decode02gluall) RANKCUT_GLU=all timeout 120 $B $L2 --random-lowrank 0.2 --compare $L2 --quiet --json "$OUT/decode_llama2-7b_keep0.2_glu_all.json" 2>&1 | tail -6 ;;
    decode08) timeout 120 $B $L2 --random-lowrank 0.8 --compare $L2 --quiet --json "$OUT/decode_llama2-7b_keep0.8.json" 2>&1 | tail -6 ;;
    llama3) timeout 120 $B $L3 --random-lowrank 0.5 --compare $L3 --quiet --json "$OUT/decode_llama3-8b_keep0.5.json" 2>&1 | tail -6 ;;
    cublas05) timeout 120 $B $L2 --random-lowrank 0.5 --compare $L2 --dense-gemv cublas --quiet --json "$OUT/decode_llama2-7b_keep0.5_cublas.json" 2>&1 | tail -6 ;;
    sdpa) timeout 120 $B $L2 --random-lowrank 0.5 --compare $L2 --attention sdpa --quiet --json "$OUT/decode_llama2-7b_keep0.5_sdpa.json" 2>&1 | tail -6 ;;
    fold05) timeout 120 $B $L2 --random-lowrank 0.5 --compare $L2 --fold --quiet --json "$OUT/decode_llama2-7b_keep0.5_fold.json" 2>&1 | tail -6 ;;
    foldab) timeout ${FOLDAB_LIMIT:-200} python3 benchmarks/fold_bench.py --json "$OUT/fold_bench.json" 2>&1 | grep -v Warn | tail -10 ;;
    sweep) timeout ${SWEEP_LIMIT:-200} python3 benchmarks/plan_sweep.py --budget-s ${SWEEP_BUDGET:-15} --json "$OUT/plan_sweep.json" 2>&1 | grep -v Warn | tail -30 ;;
    layer1) timeout ${LAYER_LIMIT:-200} python3 benchmarks/layer_bench.py --rows 1 --no-tune --json "$OUT/layer_bench_m1.json" 2>&1 | grep -v Warn | tail -32 ;;
    profile) timeout 120 python3 benchmarks/profile_step.py --json "$OUT/profile_step.json" 2>&1 | grep -v Warn | tail -24 ;;
    generate) timeout ${GEN_LIMIT:-170} python3 benchmarks/generate_7b.py --tokenizer .carry/data/testbed/codellama-16m \
                --keeps ${GEN_KEEPS:-dense,0.5} --json "$OUT/generate_7b.json" 2>&1 | grep -v Warn | tail -6 ;;
    batch05) timeout 200 $B $L2 --random-lowrank 0.5 --compare $L2 --batch 1,8,32,128 --quiet --json "$OUT/batch_llama2-7b_keep0.5.json" 2>&1 | tail -12 ;;
    batch08) timeout 200 $B $L2 --random-lowrank 0.8 --compare $L2 --batch 1,8,32,128 --quiet --json "$OUT/batch_llama2-7b_keep0.8.json" 2>&1 | tail -12 ;;
    tests) timeout ${TESTS_LIMIT:-200} python3 -m pytest -q -m gpu ${TESTS:-tests/test_decode_attention.py tests/test_folds.py tests/test_generate.py tests/test_bench.py tests/test_quant_layers.py} -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt" ;;
  esac
done
echo "=== done $(date +%T)"
