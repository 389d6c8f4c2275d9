#!/usr/bin/env bash
# The quick all-methods smoke comparison (docs/results.md): every method of the paper's comparison on the lite
# polyp federation with one budget, one seed (the evidence is the seeded study: python -m bench.study)
# (configs/compare_lite.yaml), one after another, then the table (test.py --compare).
# Usage: bash bench/compare_lite.sh [method ...]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
HOMOGENEOUS="lssl mean_teacher fixmatch unimatch eln semifl"
HETEROGENEOUS="hssf local fedmd ktpfl feddistill fedproto rhfl"
# hssf_exact: hssf with the exact exchange reductions (grades first, head-resolution logits): the same run
EXACT="hssf.grades_first=true hssf.logits_at=head"
METHODS=${*:-"$HETEROGENEOUS $HOMOGENEOUS hssf_exact"}
for m in $METHODS; do
  [ -f "runs/compare_lite/$m/results.json" ] && { echo "$m: done"; continue; }
  extra=()
  case " $HOMOGENEOUS " in *" $m "*) extra=("models.clients=[resnet34, resnet34, resnet34, resnet34]");; esac
  method=$m
  [ "$m" = hssf_exact ] && { method=hssf; extra=($EXACT); }
  echo "== $m"
  python train.py --config configs/compare_lite.yaml --overwrite --quiet --set method=$method name=$m "${extra[@]}" \
    || echo "$m FAILED (exit $?)"
done
runs=()
for m in $HETEROGENEOUS $HOMOGENEOUS hssf_exact; do
  [ "$m" != hssf ] && [ -f "runs/compare_lite/$m/results.json" ] && runs+=("runs/compare_lite/$m")
done
python test.py --compare "${runs[@]}" --reference runs/compare_lite/hssf --out runs/compare_lite/table
