#!/usr/bin/env bash
# The GPU runs of the reproductions and benchmarks, on the JAX and torch
# backends, bundled as $OUT/gpu_results.tar.gz (paths as in the repository:
# reproductions/results/gpu/, benchmarks/results/gpu/) plus $OUT/run.log and
# $OUT/manifest.md. See benchmarks/gpu/README.md for the wheels, the device
# call and the unpacking.
#
#   bash benchmarks/gpu/run.sh             # on the GPU machine (OUT set there)
#   bash benchmarks/gpu/run.sh --dry-run   # toy sizes on the CPU, < 3 min
#
# Environment: OUT (required on the GPU; a temporary folder in a dry run),
# PYTHON (default python3), GPU_DEADLINE (seconds for all steps; default 480,
# 540 in a dry run). Steps that would start past the deadline are skipped; the
# center-loss reproduction runs one seed after another while time is left.
set -euo pipefail

DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
if [ "$DRY" = 1 ]; then
    OUT=${OUT:-$(mktemp -d)}
else
    : "${OUT:?set OUT to the folder for the results}"
fi
export OUT
mkdir -p "$OUT"

# Everything printed goes to $OUT/run.log too.
if [ -z "${GPU_RUN_LOGGING:-}" ]; then
    export GPU_RUN_LOGGING=1
    set +e
    bash "${BASH_SOURCE[0]}" "$@" 2>&1 | tee "$OUT/run.log"
    exit "${PIPESTATUS[0]}"
fi

PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3 MPLBACKEND=Agg
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # leave GPU memory to torch too
if [ "$DRY" = 1 ]; then
    DEADLINE=${GPU_DEADLINE:-540}
    MODE="dry run (CPU, toy sizes)"
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
    DEADLINE=${GPU_DEADLINE:-480}
    MODE="GPU"
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site .whl/*.whl || echo "installing .whl/ failed"
        export PYTHONPATH="/tmp/site:$ROOT"
    else
        echo "no .whl/ folder: keras and animal-mnist must be installed already"
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
FLAG=""
if [ "$DRY" = 1 ]; then FLAG=" --dry-run"; fi
RESERVE=15   # seconds kept for the bundle
MIN_STEP=10  # no step starts with less than this left

STAGE=$(mktemp -d)
REPRO=$STAGE/reproductions/results/gpu
BENCH=$STAGE/benchmarks/results/gpu
mkdir -p "$REPRO/logs" "$BENCH/logs"
MANIFEST=$STAGE/manifest.md
FAILED=()
LAST_RC=0
LAST_SECONDS=0

finish() {
    local rc=$?
    {
        echo
        echo "Total wall time ${SECONDS} s; failed steps: ${FAILED[*]:-none}."
    } >>"$MANIFEST"
    cp "$MANIFEST" "$REPRO/MANIFEST.md"
    cp "$MANIFEST" "$BENCH/MANIFEST.md"
    cp "$MANIFEST" "$OUT/manifest.md"
    tar -czf "$OUT/gpu_results.tar.gz" -C "$STAGE" reproductions benchmarks
    rm -rf "$STAGE"
    echo "[${SECONDS} s] wrote $OUT/gpu_results.tar.gz, $OUT/manifest.md, $OUT/run.log"
    if [ "$rc" = 0 ] && [ ${#FAILED[@]} -gt 0 ]; then rc=1; fi
    exit "$rc"
}
trap finish EXIT

# run_step KIND DIR NAME CAP COMMAND...: runs COMMAND in $STAGE (so that
# relative --out paths are the repository's) for at most CAP seconds, less if
# the deadline is nearer, and records it in the manifest, "$ROOT/" left out.
# KIND "table": stdout to DIR/NAME.txt, stderr to DIR/logs/NAME.log; "log":
# both to DIR/logs/NAME.log.
run_step() {
    local kind=$1 dir=$2 name=$3 cap=$4
    shift 4
    local cmd left limit t0 rc=0
    cmd=$(printf '%q ' "$@")
    cmd=${cmd//"$ROOT/"/}
    cmd=${cmd//\\,/,}
    left=$((DEADLINE - SECONDS - RESERVE))
    LAST_RC=0
    LAST_SECONDS=0
    if [ "$left" -lt "$MIN_STEP" ]; then
        echo "[${SECONDS} s] skip $name: ${left} s left"
        printf '| %s | skipped: no time left | | `%s` |\n' "$name" "${cmd% }" >>"$MANIFEST"
        LAST_RC=skipped
        return 0
    fi
    limit=$((cap < left ? cap : left))
    echo "[${SECONDS} s] $name (at most ${limit} s): ${cmd% }"
    t0=$SECONDS
    if [ "$kind" = table ]; then
        (cd "$STAGE" && timeout -k 10 "$limit" "$@") \
            >"$dir/$name.txt" 2>"$dir/logs/$name.log" || rc=$?
    else
        (cd "$STAGE" && timeout -k 10 "$limit" "$@") >"$dir/logs/$name.log" 2>&1 || rc=$?
    fi
    LAST_RC=$rc
    LAST_SECONDS=$((SECONDS - t0))
    printf '| %s | %s | %s | `%s` |\n' "$name" "$rc" "$LAST_SECONDS" "${cmd% }" >>"$MANIFEST"
    echo "[${SECONDS} s] $name: exit $rc after ${LAST_SECONDS} s"
    if [ "$rc" != 0 ]; then
        tail -n 25 "$dir/logs/$name.log" | sed 's/^/    /'
        if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
            echo "    (stopped at its time limit)"
        fi
    fi
    return 0
}

failed_unless_ok() {  # failed_unless_ok NAME: a failed or stopped step counts
    if [ "$LAST_RC" != 0 ] && [ "$LAST_RC" != skipped ]; then FAILED+=("$1"); fi
}

# --- manifest: machine, versions ---------------------------------------------
{
    echo "# GPU results: $MODE"
    echo
    echo "Date: $(date -u '+%Y-%m-%d %H:%M UTC'). Command: \`bash benchmarks/gpu/run.sh$FLAG\`," \
        "deadline ${DEADLINE} s."
    echo "Commit: $(git rev-parse HEAD 2>/dev/null || echo 'n/a (no .git)')."
    echo
    echo '```'
    echo "\$ nvidia-smi -L"
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L 2>&1 || true; else echo "(no nvidia-smi)"; fi
    echo "\$ CPU"
    echo "$(nproc) x $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //')"
    echo "\$ versions"
    KERAS_BACKEND=jax "$PY" - <<'EOF' 2>&1 || true
import platform, sys
print("python", platform.python_version(), sys.executable)
import numpy; print("numpy", numpy.__version__)
try:
    import jax, jaxlib
    print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "devices", jax.devices())
except Exception as e:
    print("jax: not available:", e)
try:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
    print("torch", torch.__version__, "cuda", torch.version.cuda, gpu)
except Exception as e:
    print("torch: not available:", e)
try:
    import keras, keras_batchfix
    print("keras", keras.__version__, "from", keras.__file__)
    print("keras_batchfix from", keras_batchfix.__file__)
except Exception as e:
    print("keras: not available:", e)
EOF
    if [ "$DRY" = 0 ]; then
        echo "\$ ls .whl"
        ls .whl 2>&1 || true
    fi
    echo '```'
    echo
    echo "Steps (exit 124: stopped at its time limit). Each command, run from the"
    echo "repository root, writes where the tarball unpacks; PYTHONPATH=${PYTHONPATH//"$ROOT"/.}"
    echo
    echo "| step | exit | seconds | command |"
    echo "|---|---|---|---|"
} >"$MANIFEST"
sed -n '/^```$/,/^```$/p' "$MANIFEST" | grep -v '^```$'

# --- benchmarks ----------------------------------------------------------------
if [ "$DRY" = 1 ]; then
    LOSS_SIZES=(--anchors 500 --repeats 2)
    CENTER_SIZES=(--classes 10 300 --features 16 --repeats 3)
    QUICK=(--quick)
else
    LOSS_SIZES=(--repeats 15)
    CENTER_SIZES=(--repeats 30)
    QUICK=()
fi
run_step table "$BENCH" loss_speed 150 \
    "$PY" "$ROOT/benchmarks/loss_speed.py" --backends jax torch --no-memory \
    --batch-sizes 32 128 "${LOSS_SIZES[@]}"
failed_unless_ok loss_speed
for b in 32 128; do
    run_step table "$BENCH" "center_loss_speed_b$b" 90 \
        "$PY" "$ROOT/benchmarks/center_loss_speed.py" --backends jax torch --batch "$b" \
        "${CENTER_SIZES[@]}"
    failed_unless_ok "center_loss_speed_b$b"
done
if [ -f benchmarks/accumulation_speed.py ]; then
    run_step table "$BENCH" accumulation_speed 120 \
        "$PY" "$ROOT/benchmarks/accumulation_speed.py" --backends jax torch ${QUICK[@]+"${QUICK[@]}"}
    failed_unless_ok accumulation_speed
fi

# --- SSD partial-batch reproduction ------------------------------------------
for backend in jax torch; do
    run_step log "$REPRO" "ssd_partial_batch_$backend" 200 \
        env KERAS_BACKEND="$backend" "$PY" "$ROOT/reproductions/ssd_partial_batch.py" \
        --backend "$backend" --out "reproductions/results/gpu/ssd_partial_batch_$backend" \
        ${QUICK[@]+"${QUICK[@]}"}
    failed_unless_ok "ssd_partial_batch_$backend"
done

# --- center loss vs LR decay: seeds while time is left -------------------------
if [ "$DRY" = 1 ]; then
    CENTER_ARGS=(--quick --framework torch --variants relu)
    SEEDS=(0)
else
    # ResNet-18 (width 64, 512-d features), 60 epochs, 9,000 images, on CUDA.
    CENTER_ARGS=(--full --framework torch --variants relu,prelu,l2norm)
    SEEDS=(0 1 2 3 4 5 6 7 8 9)
fi
CENTER_OUT=reproductions/results/gpu/center_loss_lr_decay
last=0
for seed in "${SEEDS[@]}"; do
    left=$((DEADLINE - SECONDS - RESERVE - 20))  # 20 s kept for an analysis
    if [ "$last" -gt 0 ] && [ "$left" -lt $((last * 11 / 10)) ]; then
        echo "[${SECONDS} s] center loss: ${left} s left, a seed took ${last} s: no more seeds"
        break
    fi
    run_step log "$REPRO" "center_loss_lr_decay_seed$seed" "$left" \
        env KERAS_BACKEND=torch "$PY" "$ROOT/reproductions/center_loss_lr_decay.py" \
        "${CENTER_ARGS[@]}" \
        --seeds "$seed" --out "$CENTER_OUT"
    if [ "$LAST_RC" = 124 ] || [ "$LAST_RC" = 137 ]; then
        # stopped at the deadline: runs.csv holds the runs that ended
        if [ -f "$STAGE/$CENTER_OUT/runs.csv" ]; then
            run_step log "$REPRO" center_loss_lr_decay_analysis 60 \
                "$PY" "$ROOT/reproductions/center_loss_lr_decay.py" --analyze-only --out "$CENTER_OUT"
            failed_unless_ok center_loss_lr_decay_analysis
        fi
        break
    fi
    failed_unless_ok "center_loss_lr_decay_seed$seed"
    if [ "$LAST_RC" != 0 ]; then break; fi
    last=$LAST_SECONDS
done

# --- what the run.log shows ----------------------------------------------------
for f in "$BENCH"/*.txt "$REPRO"/*/table.md; do
    if [ -f "$f" ]; then
        echo
        echo "== ${f#"$STAGE"/}"
        cat "$f"
    fi
done
if [ -f "$STAGE/$CENTER_OUT/summary.csv" ]; then
    echo
    echo "== $CENTER_OUT/summary.csv (peak after each decay, and at controls, / before)"
    "$PY" - "$STAGE/$CENTER_OUT/summary.csv" <<'EOF' || true
import csv, sys
cols = ["framework", "variant", "width", "quantity", "n", "rises",
        "decay1_mean", "decay2_mean", "control1_mean", "control2_mean", "end3_mean"]
print(" ".join(f"{c[:13]:>13}" for c in cols))
for r in csv.DictReader(open(sys.argv[1])):
    if r["quantity"] in ("train_center", "val_center", "tr_rel"):
        print(" ".join(f"{r[c]:>13}" for c in cols))
EOF
fi
echo
