#!/usr/bin/env bash
# sharpkit's GPU checks (issues 3, 4 and 6) as one prepared script, for a session
# that is lent a GPU machine through the device tool.
#
#   bash analysis/gpu_checks.sh [STAGE ...]
#
# STAGE is one of
#   optim        bench_msam_deltasam and bench_bar at their GPU sizes       (issue 3)
#   curvature    bench_curvature, with the ~25M-parameter model rows         (issue 4)
#   experiments  the claim experiments at --scale large, resumable           (issue 6)
# (default: optim curvature). Each stage has its own time limit (seconds, from
# the environment: OPTIM_S, CURVATURE_S, EXPERIMENTS_S), so one slow stage cannot
# eat the others' time.
#
# It runs from the repository root with the machine's own python3 (torch with
# CUDA) and installs nothing but wheels carried in .whl/: bench_curvature compares
# against pyhessian, which that machine lacks. Fetch it here first, then name
# ".whl" in the run's carry:
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl pyhessian==0.1
#
# What comes back (the device tool returns at most 8 files from $OUT):
#   run.log, msam_deltasam_cuda.{md,json}, bar_cuda.{md,json},
#   curvature_cuda.{md,json}, experiments-large.tar.gz
# Copy the tables to analysis/benchmarks/results/ and unpack the archive at the
# repository root (it holds figures/experiments/*/large/ and CLAIMS-large.md).
# The experiments skip seeds already in figures/experiments/*/large/, so a second
# call, with the first call's archive unpacked in the tree, continues where the
# first stopped.
#
# DEVICE=cpu QUICK=1 OUT=/tmp/x bash analysis/gpu_checks.sh optim curvature experiments
# is the smoke test of this script on a machine without a GPU (tiny settings).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/sharpkit-gpu-checks}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg

if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

echo "== machine: $(date -u +%FT%TZ)"
python3 - <<'PY'
import torch
from sharpkit._device import describe_machine
print(describe_machine("cuda" if torch.cuda.is_available() else "cpu"))
PY
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

quick=()
[ "$QUICK" = 1 ] && quick=(--quick)
suffix=$([ "$DEVICE" = cpu ] && echo cpu || echo "$DEVICE")

stage() {  # stage NAME LIMIT_S COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    start=$(date +%s)
    timeout --signal=INT --kill-after=20 "$limit" "$@"
    rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - start)) s"
    return 0
}

run_optim() {
    stage bench_msam_deltasam "${OPTIM_S:-240}" python3 -m analysis.benchmarks.bench_msam_deltasam \
        --device "$DEVICE" --out "$OUT/msam_deltasam_$suffix.md" "${quick[@]}"
    stage bench_bar "${OPTIM_S:-240}" python3 -m analysis.benchmarks.bench_bar \
        --device "$DEVICE" --out "$OUT/bar_$suffix.md" "${quick[@]}"
}

run_curvature() {
    python3 -c "import pyhessian" 2> /dev/null || echo "note: pyhessian is missing (carry .whl, see the header)"
    stage bench_curvature "${CURVATURE_S:-300}" python3 -m analysis.benchmarks.bench_curvature \
        --device "$DEVICE" --out "$OUT/curvature_$suffix.md" "${quick[@]}"
}

run_experiments() {
    local args=(--scale large --device "$DEVICE" --out figures/experiments)
    local scale=large
    if [ "$QUICK" = 1 ]; then  # one small experiment, one seed, outside the tree
        scale=small
        args=(theorem2 --scale small --seeds 1 --device "$DEVICE" --out "$OUT/.exp/figures/experiments")
    fi
    stage experiments "${EXPERIMENTS_S:-480}" python3 -m analysis.experiments "${args[@]}"
    local root=.
    [ "$QUICK" = 1 ] && root="$OUT/.exp"
    (cd "$root" && tar -czf "$OUT/experiments-$scale.tar.gz" \
        $(ls -d figures/experiments/*/"$scale" figures/experiments/CLAIMS-"$scale".md 2> /dev/null))
    rm -rf "$OUT/.exp"
    echo "== experiments archive: $(tar -tzf "$OUT/experiments-$scale.tar.gz" | wc -l) entries"
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(optim curvature)
for s in "${stages[@]}"; do
    case "$s" in
        optim) run_optim ;;
        curvature) run_curvature ;;
        experiments) run_experiments ;;
        *) echo "unknown stage: $s (optim, curvature, experiments)"; exit 2 ;;
    esac
done
echo "== done: $(date -u +%FT%TZ)"
ls -la "$OUT"
