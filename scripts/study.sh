#!/usr/bin/env bash
# The study (docs/study.md): five optimizers at two model sizes, 3 seeds each, 300 steps, then the
# momentum advisor's study at the demo size. Two streams of one torch thread each (a 2-core
# machine); finished runs are not redone, so an interrupted study resumes where it stopped.
#   bash scripts/study.sh [OUT]        (OUT defaults to gradlens_study; logs in OUT/*.log)
set -euo pipefail
OUT=${1:-gradlens_study}
PY=${PYTHON:-.venv/bin/python}
HERE=$(cd "$(dirname "$0")" && pwd)
OPTIMIZERS=(adamw scale swan stable_spam colnorm_sgd)
mkdir -p "$OUT"
compare() { "$PY" -c "from gradlens.cli import main; raise SystemExit(main())" compare "$@"; }
(
  # demo size: a five-point lr sweep (x0.25 .. x4) on seed 0, seeds 1-2 at each best lr
  compare --out "$OUT/demo" --optimizers "${OPTIMIZERS[@]}" --lr-factors 0.25 0.5 1 2 4 \
    --seeds 3 --sweep-seeds 1 --steps 300 --threads 1
  "$PY" "$HERE/advisor_study.py" --out "$OUT/demo" --seeds 3 --steps 300 --threads 1
) > "$OUT/demo.log" 2>&1 &
demo=$!
# 3x the parameters: each optimizer's demo-tuned lr (DEFAULT_LRS), 3 seeds
compare --out "$OUT/small" --size small --optimizers "${OPTIMIZERS[@]}" --lr-factors 1 \
  --seeds 3 --steps 300 --threads 1 > "$OUT/small.log" 2>&1
wait "$demo"
echo "tables: $OUT/demo/comparison.md $OUT/small/comparison.md; advice: $OUT/demo/advisor/advice.csv"
