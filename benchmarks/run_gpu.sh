#!/usr/bin/env bash
# One GPU-machine session in one command: benchmarks/bench_gpu.py, then `crossroute demo --preset gpu`.
# Run from the repository root on a CUDA machine:  bash benchmarks/run_gpu.sh [TOTAL_SECONDS] [BENCH_SECONDS]
# Results land in $OUT (default gpu-results/): env.txt, bench_gpu.json, bench.log, demo.log, report.html and
# gpu_demo_results.tgz (the demo's results/ and run.yaml). Wheels in .whl/ (packages the machine lacks, e.g.
# trl) are installed to /tmp/site first. The demo resumes if the same command is run again.
set -u
OUT=${OUT:-gpu-results}
TOTAL=${1:-560}
BENCH=${2:-200}
DEMO_DIR=${DEMO_DIR:-/tmp/crossroute-gpu-demo}
mkdir -p "$OUT"
start=$(date +%s)
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; date -u
  python3 -c "import torch, transformers, trl, datasets; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__)"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
python3 benchmarks/bench_gpu.py --out "$OUT/bench_gpu.json" --budget-s "$BENCH" 2>&1 | tee "$OUT/bench.log"
left=$(( TOTAL - ($(date +%s) - start) - 15 ))
echo "bench done after $(( $(date +%s) - start )) s; demo gets ${left} s"
timeout "$left" python3 -m crossroute demo --preset gpu --out "$DEMO_DIR" 2>&1 | tee "$OUT/demo.log"
echo "demo exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"
cp "$DEMO_DIR/report.html" "$OUT/" 2>/dev/null
tar czf "$OUT/gpu_demo_results.tgz" -C "$DEMO_DIR" results run.yaml 2>/dev/null
ls -la "$OUT"
