#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one call of a short-lived GPU machine, most important first:
#
#   tests       the CUDA tests (augmentation and a training step equal to the CPU's, bf16 runs);
#   throughput  BYOL, ResNet-18, CIFAR-10, batch 256, gpu profile: none / SO / SRIP, augmenting
#               1 and 8 batches per call (the target: at least 10k images/s on one H100);
#               eager and compiled (reduce-overhead, the gpu profile's); THROUGHPUT_AUGMENT_BATCHES
#               and THROUGHPUT_COMPILE narrow or widen it;
#   profile     where the step's time goes (benchmarks/step_profile.py): host time per phase,
#               GPU kernel time and launches, at batch 256 and 1024 (PROFILE_REGULARIZERS,
#               PROFILE_AUGMENT_BATCHES, PROFILE_BATCH_SIZES narrow it);
#   augment     the batched augmentation against lightly's BYOLTransform (benchmarks/augment.py);
#   compile     the throughput with torch.compile (default and reduce-overhead modes), the OR
#               term eager and compiled with the encoders (--compile-or);
#   overhead    the OR term's cost on CUDA (benchmarks/or_overhead.py);
#   methods     every method's throughput in the gpu profile (compiled; METHODS_COMPILE=none: eager);
#   realrun     a short real run: BYOL + SO, gpu profile, CIFAR-10, $REAL_RUN_EPOCHS epochs
#               (more flags of `python -m or_core pretrain` in REAL_RUN_FLAGS).
#
# GPU_CHECKS="tests throughput" runs only those (default: all, in the order above). Each step has
# its own time limit and a failing step does not stop the next one. Everything is written to
# OUT: session.log, one JSON per benchmark, the real run's directory as a tarball.
#
#   usage: bash benchmarks/gpu_checks.sh OUT [DATASETS]   # DATASETS holds cifar10.tar.gz
#
# On a bare machine set OR_CORE_GIT_COMMIT to the commit of the copied tree (provenance).
set -u
OUT=${1:?usage: gpu_checks.sh OUT [DATASETS]}
export OR_CORE_SHARED_DATASETS=${2:-../shared/datasets}
export OR_CORE_CACHE=${OR_CORE_CACHE:-/tmp/or_core_cache}
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # run from the repository root; no install needed
mkdir -p "$OUT"
LOG=$OUT/session.log
PY=${PYTHON:-python3}

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "=== $name (limit ${limit}s) at $(date -u +%T)" | tee -a "$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "=== $name: rc=$rc in $(($(date +%s) - start))s" | tee -a "$LOG"
    return $rc
}

{
    echo "commit: ${OR_CORE_GIT_COMMIT:-unknown}"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    nproc
    $PY -c "import sys, torch, torchvision, lightly, or_core.train; print(sys.version.split()[0], torch.__version__, torchvision.__version__, lightly.__version__, torch.cuda.get_device_name())"
} >>"$LOG" 2>&1 || { echo "environment check failed"; tail -20 "$LOG"; exit 3; }
tail -8 "$LOG"

step data 180 $PY -c "
from or_core.data import default_data_root, extract_archive, load_split
import os
tree = extract_archive(os.path.join(os.environ['OR_CORE_SHARED_DATASETS'], 'cifar10.tar.gz'), default_data_root())
for split in ('train', 'test'):
    print(split, tuple(load_split('cifar10', split, tree.parent).images.shape))
" || { tail -20 "$LOG"; exit 4; }

want() { [[ " ${GPU_CHECKS:-tests throughput profile augment compile overhead methods realrun} " == *" $1 "* ]]; }

want tests && step cuda-tests 180 $PY -m pytest -q -p no:cacheprovider -k cuda \
    tests/test_orthogonality.py tests/test_augment.py tests/test_train.py
want throughput && step throughput-byol 300 $PY benchmarks/train_throughput.py --profile gpu --methods byol \
    --regularizers none so srip --augment-batches ${THROUGHPUT_AUGMENT_BATCHES:-1 8} \
    --compile ${THROUGHPUT_COMPILE:-none reduce-overhead} --steps 100 --warmup 20 --json "$OUT/throughput_byol.json"
want profile && step step-profile 150 $PY benchmarks/step_profile.py --profile gpu --method byol \
    --regularizers ${PROFILE_REGULARIZERS:-none so} --augment-batches ${PROFILE_AUGMENT_BATCHES:-1 8} \
    --batch-sizes ${PROFILE_BATCH_SIZES:-256 1024} --json "$OUT/step_profile.json"
want augment && step augment 120 $PY benchmarks/augment.py --num-images 5120 --repeats 5 --workers 2 \
    --json "$OUT/augment.json"
want compile && step throughput-byol-compile 240 $PY benchmarks/train_throughput.py --profile gpu --methods byol \
    --regularizers none so srip --augment-batches 8 --steps 100 --warmup 20 --compile default reduce-overhead \
    --compile-or false true --json "$OUT/throughput_byol_compile.json"
want overhead && step or-overhead 120 $PY benchmarks/or_overhead.py --no-cpu --json "$OUT/or_overhead.json"
want methods && step throughput-methods "${METHODS_LIMIT_S:-240}" $PY benchmarks/train_throughput.py --profile gpu \
    --regularizers so --augment-batches 8 --compile ${METHODS_COMPILE:-reduce-overhead} --steps 30 --warmup 10 \
    --json "$OUT/throughput_methods.json"
if want realrun; then
    step real-run "${REAL_RUN_LIMIT_S:-300}" $PY -m or_core pretrain --method byol --regularizer so --gamma 1e-6 \
        --dataset cifar10 --profile gpu --epochs "${REAL_RUN_EPOCHS:-15}" ${REAL_RUN_FLAGS:-} --out /tmp/real_run --no-progress
    tar czf "$OUT/real_run.tar.gz" --exclude checkpoint.pt -C /tmp real_run 2>>"$LOG"
fi
grep -h "images/s\|img/s\|passed\|failed\|rc=\| b[0-9]* aug\|+none \|+so \|+srip " "$LOG" | tail -60
