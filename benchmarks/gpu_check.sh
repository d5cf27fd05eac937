#!/usr/bin/env bash
# One-command GPU check: set up, run tests/gpu, the GPU train-step benchmark and the CUDA SGLang
# weight-sync benchmark, and write one report (report.md + report.json + one log per phase).
#
#   bash benchmarks/gpu_check.sh                    # report in $OUT if set, else ./gpu_report
#   bash benchmarks/gpu_check.sh --out DIR --budget 540 --python /path/to/python
#   bash benchmarks/gpu_check.sh --dry-run          # print the plan, run nothing
#   bash benchmarks/gpu_check.sh --fetch-wheels .whl   # on a machine with PyPI: wheels for an offline one
#
# Phases, each under `timeout` within the total budget (a phase that fails or runs out of time is
# recorded as such and the next one runs; one that cannot run is recorded as skipped, with the reason):
#   env          nvidia-smi, torch.cuda, package versions (benchmarks/gpu_report.py env)
#   install      the missing pieces: wheels from --wheels (offline), else from the package index when it
#                answers: base (never torch), requirements/gpu.txt (Transformer Engine), full CUDA SGLang
#                (requirements/sglang.txt + requirements/gpu-sglang.txt + sglang --no-deps)
#   tests        pytest tests/gpu
#   train_step   benchmarks/bench_train_step_gpu.py --model moe: TFLOP/s per GPU on Qwen3-30B-A3B-shaped
#                MoE layers, bf16, TE spec (the local spec, said so in the report, when TE is missing)
#   weight_sync  benchmarks/bench_weight_sync.py --device cuda into a CUDA SGLang server
# Without a CUDA device every GPU phase is skipped, the report says so, and the exit code is 2.
# Exit codes: 0 every phase that ran passed, 1 a phase failed or timed out, 2 no CUDA device, 64 usage.
# For tests: GPU_CHECK_CMD_<phase> replaces a phase's command (run with bash -c), GPU_CHECK_BOX_<phase>
# its time box in seconds, GPU_CHECK_ASSUME_CUDA=1 skips the CUDA test. See docs/gpu.md.
# Tests: tests/unit/test_gpu_check.py.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$REPO/benchmarks/gpu_check.sh"
PHASES=(env install tests train_step weight_sync)
declare -A DEFAULT_BOX=([env]=60 [install]=150 [tests]=150 [train_step]=180 [weight_sync]=180)
REPORT_RESERVE=15 # seconds kept back for writing the report
MIN_BOX=5         # with less than this left of the budget, a phase is skipped
EXIT_SKIP=3       # a phase body that cannot run exits with this after a "gpu_check: skip: REASON" line
SGLANG_FULL="pip install -r requirements/sglang.txt -r requirements/gpu-sglang.txt && pip install --no-deps sglang==0.5.23"

usage() {
    sed -n '2,24p' "$SELF" | sed 's/^# \{0,1\}//'
    cat <<'EOF'

Options:
  --out DIR          report directory (default: $OUT if set, else ./gpu_report)
  --budget S         total seconds for all phases (default 540)
  --python PY        the Python to use (default: $GPU_CHECK_PYTHON, ./.venv/bin/python, python3)
  --wheels DIR       install these wheels (--no-index --no-deps) first (default: ./.whl if it has any)
  --no-install       skip the install phase
  --train-args "..." extra arguments for bench_train_step_gpu.py (default: --layers 4 --reps 3)
  --sync-args "..."  extra arguments for bench_weight_sync.py
  --dry-run          print the plan and exit 0
  --fetch-wheels DIR download the wheels an offline GPU machine lacks (megatron-core, transformers) for
                     --wheel-python (default 3.12), then exit
EOF
}

log() { printf 'gpu_check: %s\n' "$*" >&2; }
now_ms() { date +%s%3N; }

# ---------------------------------------------------------------- phase bodies (run as `gpu_check.sh __phase NAME`)

has_module() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }
imports() { "$PY" -c "import $1" >/dev/null 2>&1; }
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$WORK/install.tsv"; } # item, status, detail

pip_online() {
    [[ -n ${PIP_ONLINE:-} ]] && { [[ $PIP_ONLINE == 1 ]]; return; }
    PIP_ONLINE=0
    if timeout 30 "$PY" -m pip download --no-deps --no-cache-dir -q -d "$WORK/probe" --timeout 5 --retries 0 packaging; then
        PIP_ONLINE=1
    fi
    [[ $PIP_ONLINE == 1 ]]
}

install_set() { # item, probe (python import line), pip arguments...
    local item=$1 probe=$2
    shift 2
    if imports "$probe"; then
        record "$item" present "import $probe works"
    elif ! pip_online; then
        record "$item" missing "import $probe fails; no package index answers"
    elif "$PY" -m pip install "$@"; then
        if imports "$probe"; then record "$item" installed "pip install $*"; else record "$item" failed "installed, import $probe still fails"; fi
    else
        record "$item" failed "pip install $* (see install.log)"
    fi
}

phase_env() {
    "$PY" "$REPO/benchmarks/gpu_report.py" env --json "$WORK/env.json"
}

phase_install() {
    cd "$REPO" || return 1
    local wheels=()
    if [[ -n $WHEELS ]]; then
        shopt -s nullglob
        wheels=("$WHEELS"/*.whl)
        shopt -u nullglob
    fi
    if ((${#wheels[@]})); then
        if "$PY" -m pip install --no-index --no-deps --no-compile -q "${wheels[@]}"; then
            record wheels installed "${#wheels[@]} from $WHEELS"
        else
            record wheels failed "pip install --no-index --no-deps $WHEELS/*.whl"
        fi
    fi
    local base
    base=$(grep -vE '^[[:space:]]*(#|$)|^torch==' requirements/base.txt | tr '\n' ' ')
    # shellcheck disable=SC2086  # one word per requirement
    install_set base "megatron.core, transformers, safetensors, yaml, pytest" $base pytest pytest-timeout
    # TE builds its torch extension against the installed torch (its install docs: no build isolation)
    install_set transformer-engine "transformer_engine.pytorch" --no-build-isolation -r requirements/gpu.txt
    if imports sgl_kernel; then
        record sglang-cuda present "import sgl_kernel works"
    elif ! pip_online; then
        record sglang-cuda missing "import sgl_kernel fails; no package index answers"
    elif "$PY" -m pip install -r requirements/sglang.txt -r requirements/gpu-sglang.txt &&
        "$PY" -m pip install --no-deps sglang==0.5.23; then
        record sglang-cuda installed "$SGLANG_FULL"
    else
        record sglang-cuda failed "$SGLANG_FULL (see install.log)"
    fi
    cat "$WORK/install.tsv"
    "$PY" "$REPO/benchmarks/gpu_report.py" env --json "$WORK/env_after.json" >/dev/null
}

phase_tests() {
    cd "$REPO" || return 1
    "$PY" -m pytest tests/gpu -q -rs -p no:cacheprovider --junitxml="$WORK/tests.xml"
}

phase_train_step() {
    cd "$REPO" || return 1
    imports megatron.core || { echo "gpu_check: skip: megatron-core is not importable (install phase: see install.log)"; return "$EXIT_SKIP"; }
    local spec=te
    if ! imports transformer_engine.pytorch; then
        spec=local
        echo "gpu_check: transformer_engine is not importable: the local layer spec instead of TE"
    fi
    local extra=()
    read -ra extra <<<"${TRAIN_ARGS:---layers 4 --reps 3}"
    "$PY" benchmarks/bench_train_step_gpu.py --model moe --spec "$spec" --json "$WORK/train_step.json" "${extra[@]}"
}

phase_weight_sync() {
    cd "$REPO" || return 1
    if ! has_module sglang || ! imports sgl_kernel; then
        echo "gpu_check: skip: full CUDA SGLang is not installed (import sgl_kernel fails): $SGLANG_FULL"
        return "$EXIT_SKIP"
    fi
    local extra=()
    read -ra extra <<<"${SYNC_ARGS:---hidden 2048 --layers 8 --vocab 32000 --repeats 3}"
    "$PY" benchmarks/bench_weight_sync.py --device cuda --json "$WORK/weight_sync.json" "${extra[@]}"
}

if [[ ${1:-} == __phase ]]; then
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    case ${2:-} in
    env) phase_env ;;
    install) phase_install ;;
    tests) phase_tests ;;
    train_step) phase_train_step ;;
    weight_sync) phase_weight_sync ;;
    *) log "unknown phase: ${2:-}"; exit 64 ;;
    esac
    exit
fi

# ---------------------------------------------------------------- options

OUT_DIR=${OUT:-./gpu_report}
BUDGET=540
PY=${GPU_CHECK_PYTHON:-}
USER_PY=$PY
WHEELS=""
INSTALL=1
DRY=0
FETCH=""
WHEEL_PY=3.12
TRAIN_ARGS=""
SYNC_ARGS=""
while (($#)); do
    case $1 in
    --out) OUT_DIR=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    --python) PY=$2; USER_PY=$2; shift ;;
    --wheels) WHEELS=$2; shift ;;
    --no-install) INSTALL=0 ;;
    --train-args) TRAIN_ARGS=$2; shift ;;
    --sync-args) SYNC_ARGS=$2; shift ;;
    --dry-run) DRY=1 ;;
    --fetch-wheels) FETCH=$2; shift ;;
    --wheel-python) WHEEL_PY=$2; shift ;;
    -h | --help) usage; exit 0 ;;
    *) log "unknown option: $1 (see --help)"; exit 64 ;;
    esac
    shift
done
[[ $BUDGET =~ ^[0-9]+$ ]] || { log "--budget wants whole seconds, got '$BUDGET'"; exit 64; }

if [[ -n $FETCH ]]; then
    # The lent GPU machines reach no package index; their image has torch but not these (see docs/gpu.md).
    platforms=()
    for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        platforms+=(--platform "$tag")
    done
    exec "${PY:-python3}" -m pip download --no-deps --only-binary=:all: --python-version "$WHEEL_PY" \
        --implementation cp "${platforms[@]}" -d "$FETCH" megatron-core==0.16.1 transformers==5.19.0
fi

if [[ -z $PY ]]; then
    if [[ -x $REPO/.venv/bin/python ]]; then PY=$REPO/.venv/bin/python; else PY=$(command -v python3 || echo python3); fi
fi
if [[ -z $WHEELS && -d $REPO/.whl ]]; then WHEELS=$REPO/.whl; fi
OUT_DIR=$(realpath -m "$OUT_DIR")
PY_ABS=$(command -v "$PY" || true)

cmd_for() { # the command a phase runs, as shown in the plan
    local override="GPU_CHECK_CMD_$1"
    if [[ -n ${!override:-} ]]; then echo "${!override}"; return; fi
    case $1 in
    env) echo "$PY benchmarks/gpu_report.py env --json WORK/env.json" ;;
    install) echo "wheels from ${WHEELS:-(none)}; else pip (if an index answers): base minus torch, requirements/gpu.txt, $SGLANG_FULL" ;;
    tests) echo "$PY -m pytest tests/gpu -q -rs --junitxml=WORK/tests.xml" ;;
    train_step) echo "$PY benchmarks/bench_train_step_gpu.py --model moe --spec te|local ${TRAIN_ARGS:---layers 4 --reps 3} --json WORK/train_step.json" ;;
    weight_sync) echo "$PY benchmarks/bench_weight_sync.py --device cuda ${SYNC_ARGS:---hidden 2048 --layers 8 --vocab 32000 --repeats 3} --json WORK/weight_sync.json" ;;
    esac
}

box_for() {
    local override="GPU_CHECK_BOX_$1"
    echo "${!override:-${DEFAULT_BOX[$1]}}"
}

if ((DRY)); then
    echo "gpu_check plan: python $PY (${PY_ABS:-not found}), report in $OUT_DIR, budget $BUDGET s"
    for phase in "${PHASES[@]}"; do
        note=""
        [[ $phase == install && $INSTALL == 0 ]] && note=" [skipped: --no-install]"
        printf '  %-12s box %4s s  %s%s\n' "$phase" "$(box_for "$phase")" "$(cmd_for "$phase")" "$note"
    done
    echo "  report       $OUT_DIR/report.md, $OUT_DIR/report.json (+ one <phase>.log each)"
    exit 0
fi

# ---------------------------------------------------------------- run the phases

mkdir -p "$OUT_DIR" || { log "cannot create $OUT_DIR"; exit 64; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PY WORK WHEELS TRAIN_ARGS SYNC_ARGS
echo "$BUDGET" >"$WORK/budget"
: >"$WORK/phases.tsv"
START_MS=$(now_ms)
CUDA=0

add_phase() { # name status rc seconds box log reason
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$WORK/phases.tsv"
    log "$1: $2${7:+ ($7)} in $4 s"
}

run_phase() {
    local name=$1 box elapsed left override="GPU_CHECK_CMD_$1" logf="$1.log" start rc status reason=""
    elapsed=$((($(now_ms) - START_MS) / 1000))
    left=$((BUDGET - elapsed - REPORT_RESERVE))
    box=$(box_for "$name")
    if ((left < MIN_BOX)); then
        add_phase "$name" skipped "" 0 0 "" "budget exhausted ($elapsed s of $BUDGET s used)"
        return
    fi
    ((box > left)) && box=$left
    log "$name: up to $box s, log $OUT_DIR/$logf"
    start=$(now_ms)
    if [[ -n ${!override:-} ]]; then
        timeout -k 10 "$box" bash -c "${!override}" >"$OUT_DIR/$logf" 2>&1
    else
        timeout -k 10 "$box" bash "$SELF" __phase "$name" >"$OUT_DIR/$logf" 2>&1
    fi
    rc=$?
    local seconds
    seconds=$(awk -v ms=$(($(now_ms) - start)) 'BEGIN { printf "%.1f", ms / 1000 }')
    case $rc in
    0) status=passed ;;
    124 | 137) status=timed_out; reason="no result within its $box s box" ;;
    "$EXIT_SKIP")
        status=skipped
        reason=$(grep -o 'gpu_check: skip: .*' "$OUT_DIR/$logf" | tail -n 1 | cut -c 18-)
        ;;
    *) status=failed; reason="exit code $rc" ;;
    esac
    add_phase "$name" "$status" "$rc" "$seconds" "$box" "$logf" "$reason"
}

run_phase env
if [[ ${GPU_CHECK_ASSUME_CUDA:-0} == 1 ]]; then
    CUDA=1
elif [[ -f $OUT_DIR/env.log ]]; then
    CUDA=$(grep -o '^cuda_devices=[0-9]*' "$OUT_DIR/env.log" | tail -n 1 | cut -d= -f2)
    CUDA=${CUDA:-0}
fi
echo "$CUDA" >"$WORK/cuda"
if ((CUDA == 0)); then
    log "NO CUDA DEVICE: $PY sees none (torch.cuda.is_available() is False or torch is missing; see env.log)"
fi
: >"$WORK/install.tsv"
if ((CUDA && INSTALL)) && [[ -z $USER_PY && -z ${GPU_CHECK_CMD_install:-} ]] &&
    "$PY" -c 'import sys; sys.exit(sys.prefix != sys.base_prefix)' 2>/dev/null; then
    # Installs go into a venv, never into the system Python: .venv on top of it (its CUDA torch stays visible).
    if timeout 120 "$PY" -m venv --system-site-packages "$REPO/.venv" >&2; then
        printf 'venv\tcreated\t%s (--system-site-packages over %s)\n' "$REPO/.venv" "$PY" >>"$WORK/install.tsv"
        PY=$REPO/.venv/bin/python
    else
        printf 'venv\tfailed\tpython -m venv --system-site-packages %s\n' "$REPO/.venv" >>"$WORK/install.tsv"
    fi
fi

for phase in "${PHASES[@]:1}"; do
    if ((CUDA == 0)); then
        add_phase "$phase" skipped "" 0 0 "" "no CUDA device"
    elif [[ $phase == install && $INSTALL == 0 ]]; then
        add_phase "$phase" skipped "" 0 0 "" "--no-install"
    else
        run_phase "$phase"
    fi
done

report_py=$PY
"$report_py" -c '' 2>/dev/null || report_py=python3
if ! "$report_py" "$REPO/benchmarks/gpu_report.py" report --work "$WORK" --out "$OUT_DIR"; then
    log "writing the report failed; the raw phase table:"
    cat "$WORK/phases.tsv" >&2
    exit 1
fi
log "report: $OUT_DIR/report.md"
((CUDA == 0)) && exit 2
if cut -f2 "$WORK/phases.tsv" | grep -qE '^(failed|timed_out)$'; then exit 1; fi
exit 0
