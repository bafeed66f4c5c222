#!/bin/bash
# Everything issue #4 measures on the GPU, in one device call (stages in priority order, each time-boxed).
# Usage: bash benchmarks/gpu_run.sh OUTDIR [stages...]   stages: tests layer decode quick
set -u
OUT=${1:?outdir}; shift
STAGES=${*:-"tests layer decode"}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
mkdir -p "$OUT" "$TRITON_CACHE_DIR"
if ls .carry/triton_cache.part* >/dev/null 2>&1; then cat .carry/triton_cache.part* | tar -xz -C "$TRITON_CACHE_DIR" 2>/dev/null; fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
for s in $STAGES; do
  echo "=== stage $s $(date +%T)"
  case $s in
    tests) timeout 170 python3 -m pytest -q -m gpu tests/test_kernels.py tests/test_bench.py -x -p no:cacheprovider \
             --timeout 120 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt" ;;
    quick) timeout 90 python3 -m rankcut.cli bench random:llama2-7b --layers 4 --random-lowrank 0.5 \
             --compare random:llama2-7b --new-tokens 64 --repeats 2 --quiet --json "$OUT/decode_quick.json" ;;
    layer) timeout 240 python3 benchmarks/layer_bench.py --json "$OUT/layer_bench.json" 2>&1 | tail -70 ;;
    layerfast) timeout 200 python3 benchmarks/layer_bench.py --no-tune --json "$OUT/layer_bench.json" 2>&1 | tail -70 ;;
    decode) timeout 300 python3 benchmarks/decode_bench.py --out "$OUT" 2>&1 | grep -v Warning ;;
    nopdl) RANKCUT_PDL=0 timeout 120 python3 -m rankcut.cli bench random:llama2-7b --random-lowrank 0.5 \
             --compare random:llama2-7b --quiet --json "$OUT/decode_llama2-7b_keep0.5_nopdl.json" 2>&1 | grep -v Warn ;;
    profile) timeout 90 python3 benchmarks/profile_phases.py --json "$OUT/profile_phases.json" 2>&1 | tail -30 ;;
    decode2) timeout 200 python3 benchmarks/decode_bench.py --out "$OUT" --only llama2-7b_keep0.5 llama3-8b_keep0.5 2>&1 ;;
  esac
done
ls -la "$OUT"
