#!/usr/bin/env bash
# One GPU session in one command (run from the repo root on the device; every step's output goes to
# one log under $OUT, default .dev/out/, and to stdout).
#
#   bash scripts/gpu_session.sh [STEP ...]          # default: all steps, in this order
#   STEPS="tests grouped" bash scripts/gpu_session.sh
#   DRY_RUN=1 bash scripts/gpu_session.sh tests mega # print the plan only
#
# Steps (each under `timeout`; T_<STEP>=seconds overrides its limit; a failing step does not stop the others):
#   smi        nvidia-smi, clocks and power limits                                  (T_SMI, 30)
#   tests      python3 -m pytest -q -x tests/gpu                                    (T_TESTS, 240)
#   grouped    scripts/bench_grouped_gemm.py, with the Marlin peer                  (T_GROUPED, 300)
#   mega       scripts/bench_mega_moe.py --experts-per-rank 8 --tokens 16,128,4096, with the SGLang peer
#                                                                                   (T_MEGA, 540)
#   sustained  scripts/bench_grouped_gemm.py --sustained (decode, ours and Marlin, 3 s each, clocks + power)
#                                                                                   (T_SUSTAINED, 240)
#   layer      scripts/run_moe_layer.py --full --tokens 128                         (T_LAYER, 300)
#   marlin     scripts/peers/marlin_nvfp4.py alone (check + times)                  (T_MARLIN, 180)
#   sgl        scripts/peers/sgl_mega_moe.py alone (random routing)                 (T_SGL, 420)
# Extra arguments for a step's command: ARGS_<STEP>="..." (e.g. ARGS_GROUPED="--tokens 1,16 --no-torch").
# BUDGET (default 585 s): the whole call's limit; each step gets min(its limit, what is left - 5 s) and a step
# with less than 30 s left is skipped, so the summary line is always written inside one 600 s device call.
#
# Set-up, always: the wheels in .whl/*.whl into /tmp/site (nvidia-cutlass: the JIT's CUTLASS/CuTe headers),
# PYTHONPATH=/tmp/site:<repo>; .whl/sgl/*.whl into /tmp/sgl_site (SGLang's deep_gemm + tvm_ffi, used only by
# its worker process, never on our path); NVLink multicast off; the CUDA driver's JIT cache in /tmp (the
# Marlin binary has PTX only for sm_90: its module JIT-compiles once, about 30 s, then every later process
# of this call reuses it).
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-$ROOT/.dev/out}
mkdir -p "$OUT"
LOG=$OUT/session.log
ALL_STEPS="smi tests grouped mega sustained layer"
KNOWN_STEPS="$ALL_STEPS marlin sgl"

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
export CUDA_MODULE_LOADING=${CUDA_MODULE_LOADING:-LAZY}
export CUDA_CACHE_PATH=${CUDA_CACHE_PATH:-/tmp/dg_cuda_cache} CUDA_CACHE_MAXSIZE=${CUDA_CACHE_MAXSIZE:-4294967296}
export DG_PEER_SGL_CACHE=${DG_PEER_SGL_CACHE:-/tmp/dg_peer_sgl_cache}

if [ $# -gt 0 ]; then steps="$*"; else steps=${STEPS:-$ALL_STEPS}; fi
for s in $steps; do
    case " $KNOWN_STEPS " in *" $s "*) ;; *) echo "unknown step '$s' (known: $KNOWN_STEPS)" >&2; exit 2 ;; esac
done

step_cmd() {  # the command line of a step
    case $1 in
        smi) echo "nvidia-smi && nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit,power.max_limit --format=csv" ;;
        tests) echo "python3 -m pytest -q -x tests/gpu ${ARGS_TESTS:-}" ;;
        grouped) echo "python3 scripts/bench_grouped_gemm.py ${ARGS_GROUPED:-}" ;;
        mega) local pt=$(( ${2:-540} - 150 )); [ $pt -lt 60 ] && pt=60
              echo "python3 scripts/bench_mega_moe.py --experts-per-rank 8 --tokens 16,128,4096 --peer-timeout $pt ${ARGS_MEGA:-}" ;;
        sustained) echo "python3 scripts/bench_grouped_gemm.py --no-torch --no-peer-check --tokens 1,16 --sustained --sustained-tokens 1,4,16 --sustained-seconds 3 ${ARGS_SUSTAINED:-}" ;;
        layer) echo "python3 scripts/run_moe_layer.py --full --tokens 128 ${ARGS_LAYER:-}" ;;
        marlin) echo "python3 scripts/peers/marlin_nvfp4.py --tokens 1,4,16,64,256 ${ARGS_MARLIN:-}" ;;
        sgl) echo "python3 scripts/peers/sgl_mega_moe.py --tokens 16,128,4096 ${ARGS_SGL:-}" ;;
    esac
}

step_timeout() {
    local var="T_$(echo "$1" | tr '[:lower:]' '[:upper:]')"
    local def
    case $1 in smi) def=30 ;; tests) def=240 ;; grouped) def=300 ;; mega) def=540 ;; sustained) def=240 ;;
               layer) def=300 ;; marlin) def=180 ;; sgl) def=420 ;; esac
    echo "${!var:-$def}"
}

BUDGET=${BUDGET:-585}
if [ -n "${DRY_RUN:-}" ]; then
    for s in $steps; do lim=$(step_timeout "$s"); echo "$s [$lim s]: $(step_cmd "$s" "$lim")"; done
    echo "(budget ${BUDGET} s for the whole call)"
    exit 0
fi

session_start=$(date +%s)
say() { echo "$*" | tee -a "$LOG"; }
: > "$LOG"
say "== gpu_session $(date -u +%FT%TZ) steps: $steps (log $LOG)"
say "== git $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --short 2>/dev/null | wc -l) changed files"

# set-up: carried wheels
if ls .whl/*.whl >/dev/null 2>&1; then
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            >>"$LOG" 2>&1; then
        say "== installed into /tmp/site: $(cd .whl && ls *.whl | tr '\n' ' ')"
    else
        say "== pip install of .whl/*.whl FAILED (see log); the JIT may lack the CUTLASS headers"
    fi
fi
export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/sgl/*.whl >/dev/null 2>&1; then
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/sgl_site \
            .whl/sgl/*.whl >>"$LOG" 2>&1; then
        export DG_PEER_SGL_SITE=/tmp/sgl_site
        say "== SGLang peer site /tmp/sgl_site: $(cd .whl/sgl && ls *.whl | tr '\n' ' ')"
    else
        say "== pip install of .whl/sgl/*.whl FAILED: the SGLang peer will try again itself"
    fi
fi
[ -f .whl/vllm_moe/_moe_C.abi3.so ] && say "== Marlin peer binary .whl/vllm_moe/_moe_C.abi3.so ($(du -m .whl/vllm_moe/_moe_C.abi3.so | cut -f1) MB)"
python3 -c "import torch, sys; print('== python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU')" 2>&1 | tee -a "$LOG"

summary=""
for s in $steps; do
    lim=$(step_timeout "$s")
    left=$(( BUDGET - ($(date +%s) - session_start) - 5 ))
    if [ $left -lt 30 ]; then
        say ""; say "== [$s] SKIPPED: ${left} s left of the ${BUDGET} s budget"
        summary="$summary $s:skipped"
        continue
    fi
    [ $left -lt $lim ] && lim=$left
    cmd=$(step_cmd "$s" "$lim")
    say ""
    say "== [$s] start $(date -u +%T), limit ${lim} s, elapsed $(( $(date +%s) - session_start )) s: $cmd"
    t0=$(date +%s)
    set -o pipefail
    timeout -k 10 "$lim" bash -c "$cmd" 2>&1 | tee -a "$LOG"
    rc=$?
    set +o pipefail
    dt=$(( $(date +%s) - t0 ))
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && say "== [$s] TIMED OUT after ${lim} s"
    say "== [$s] rc=$rc in ${dt} s"
    summary="$summary $s:rc=$rc/${dt}s"
done
say ""
say "== summary:$summary (total $(( $(date +%s) - session_start )) s)"
