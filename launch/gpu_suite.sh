#!/usr/bin/env bash
# The benchmark suite on a bare GPU machine: install, prepare CIFAR-10, run every item within a budget, print suite.md.
#
#   launch/gpu_suite.sh [CIFAR_ARCHIVE_OR_DIR [suite flags ...]]
#
# CIFAR_ARCHIVE_OR_DIR: a .tar.gz / .tar holding train/<class>/*.jpg and test/<class>/*.jpg (converted once into
# $DATA_DIR/cifar-10-batches-py/ by python -m ddp_resnet.data.cifar_from_images), such an image tree as a folder, a
# folder holding cifar-10-batches-py/, or that folder itself. Without it (or with ""), the suite runs without real
# CIFAR-10: item 2 on synthetic images, item 3 skipped, item 4 on random images. Further arguments go to the suite,
# e.g. launch/gpu_suite.sh data.tar.gz --only resnet50_224,fast_recipe
#
# Env: SUITE_BUDGET_S (seconds, default 480), OUT (results, default suite_out), DATA_DIR (converted CIFAR-10, default
# data), SCRATCH (generated JPEG tree and CIFAR files, kept out of OUT; default /tmp/ddp_resnet_suite_scratch),
# PYTHON (default python3). The suite's output is also written to $OUT/suite.log.
# Exit code: the suite's (0 every item measured or skipped, 1 an item failed, 2 bad arguments).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-suite_out}"
DATA_DIR="${DATA_DIR:-data}"
SCRATCH="${SCRATCH:-/tmp/ddp_resnet_suite_scratch}"
BUDGET="${SUITE_BUDGET_S:-480}"
SRC="${1:-}"
if [[ "$#" -gt 0 ]]; then shift; fi

echo "gpu_suite: installing ddp_resnet from $ROOT ($("$PYTHON" --version 2>&1))"
"$PYTHON" -m pip install -q -e . --no-deps --no-build-isolation
if ! "$PYTHON" -c "import numpy, PIL, torch, torchvision, yaml, ddp_resnet.suite" 2>/dev/null; then
    echo "gpu_suite: imports fail with --no-deps; installing the dependencies too"
    "$PYTHON" -m pip install -q -e .
fi

cifar=()
if [[ -n "$SRC" ]]; then
    if [[ -d "$SRC/cifar-10-batches-py" ]]; then
        cifar=(--cifar-root "$SRC")
    elif [[ -d "$SRC" && "$(basename "$SRC")" == "cifar-10-batches-py" ]]; then
        cifar=(--cifar-root "$(dirname "$SRC")")
    elif [[ -f "$SRC" || -d "$SRC/train" ]]; then
        echo "gpu_suite: CIFAR-10 from $SRC into $DATA_DIR/cifar-10-batches-py/"
        "$PYTHON" -m ddp_resnet.data.cifar_from_images "$SRC" "$DATA_DIR"
        cifar=(--cifar-root "$DATA_DIR")
    else
        echo "gpu_suite: $SRC is not a CIFAR-10 archive, an image tree, or a folder holding cifar-10-batches-py/" >&2
        exit 2
    fi
fi

mkdir -p "$OUT" "$SCRATCH"
set +e
"$PYTHON" -m ddp_resnet.bench suite --out "$OUT" --budget-s "$BUDGET" --scratch "$SCRATCH" \
    ${cifar[@]+"${cifar[@]}"} "$@" 2>&1 | tee "$OUT/suite.log"
status="${PIPESTATUS[0]}"
set -e
if [[ -f "$OUT/suite.md" ]]; then
    echo
    cat "$OUT/suite.md"
fi
exit "$status"
