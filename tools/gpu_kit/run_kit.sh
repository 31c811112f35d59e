#!/usr/bin/env bash
# Check a GPU machine that has no network, in one command from the repository root:
#
#     tools/gpu_kit/run_kit.sh
#
# Parts, in order (each one runs even when an earlier one failed; the exit status is
# non-zero when any failed, and summary.txt says which):
#   install  the wheels of .whl/ (tools/gpu_kit/build_wheels.sh) into /tmp/site, offline
#   env      nvidia-smi, torch / CUDA / megatron-core / Transformer Engine versions, TF32
#            defaults, a bf16 matmul on the GPU checked against the CPU, and the compile probe
#            (tools/gpu_kit/compile_probe.py: the C compiler Triton takes, and a tiny
#            torch.compile'd function run with empty caches against eager; every GPU path
#            compiles, so without a compiler the part fails), bounded by what is left of the
#            part's limit
#   tests    python -m pytest -v -m gpu tests/gpu (per-test time limits, see tests/gpu/conftest.py;
#            the numbers a test compared, e.g. FlexAttention against SDPA, are in junit.xml's
#            system-out), all but tests/gpu/test_gpu_vllm.py (the vllm part). junit.xml is
#            rewritten as each test starts and ends (tests/gpu/kit_record.py): a part killed
#            at its limit keeps every test that ended and names the one that was running
#   bench    benchmarks/gpu_bench.py: InternVL2-2B (random init, bf16) step time, tokens/s, MFU,
#            peak memory per attention (FlexAttention, per-pair SDPA, TE's own when installed)
#            x layout (packed rows of several pairs, unpacked causal rows) x row length
#            (4k, 8k, 12k; every attention and layout at 4k first); bench.json is rewritten
#            after every configuration, and no new configuration starts once
#            KIT_BENCH_BUDGET seconds have passed
#   vllm     tests/gpu/test_gpu_vllm.py: the vllm generation engine against the transformers
#            engine (greedy, float32, token for token), sampling reproducibility and samples/s
#            (the line starting "vllm:"), appended to tests.log. vLLM is not among the kit's
#            wheels: it is looked up first (limit KIT_T_VLLM_LOOKUP), and without an importable
#            vllm the part is "skipped" (one line); carry vLLM and its dependencies into
#            KIT_SITE to run it
# Results (at most 8 files) go to $OUT (default /tmp/gpu_kit_out): summary.txt, env.txt,
# install.log, tests.log, junit.xml, e2e_losses.json (GPU vs CPU loss curves), bench.log,
# bench.json.
#
# Time: the target is 8 minutes (480 s) of device time. Estimated on an H200 (the kit has
# not run on one yet): about 10-30 s install, 30 s env (a cold torch import and the compile
# probe), 3-3.5 min tests (FlexAttention compiles included), 2 min bench. Each step has a
# hard limit (below), and a step still running at its limit gets SIGTERM, then SIGKILL after
# KIT_KILL_GRACE (5 s): install 35 + env 65 + tests 205 + bench 135 + vLLM lookup 10 =
# 450 s of limits, plus 5 x 5 s of grace: worst case 475 s while vLLM is absent (the
# summary at the end takes about a second more). With vLLM the vllm part adds up to
# KIT_T_VLLM (300 s; estimated 1-3 min, mostly vLLM's start): run it on its own then,
# KIT_PARTS=install,env,vllm.
#
# Settings (environment): OUT, KIT_WHEELS (.whl), KIT_SITE (/tmp/site), KIT_PARTS
# (install,env,tests,bench,vllm), KIT_TESTS (what the tests part runs: tests/gpu, or other
# test paths), KIT_TESTS_K (a pytest -k expression for it), KIT_BENCH_ARGS (extra
# gpu_bench.py arguments, e.g. "--steps 2 --row-lengths 4096,8192"), KIT_ALLOW_CPU=1 (dry
# run without a GPU: env fails neither for the missing GPU nor for a compile probe that
# fails on the CPU), limits in seconds KIT_T_INSTALL (35), KIT_T_ENV
# (65), KIT_T_TESTS (205), KIT_T_BENCH (135), KIT_BENCH_BUDGET (KIT_T_BENCH - 50: the longest
# configuration, a 12k row with its FlexAttention compile, must still end inside the
# bench's limit), KIT_T_VLLM_LOOKUP (10), KIT_T_VLLM (300), KIT_KILL_GRACE (5).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
OUT="${OUT:-/tmp/gpu_kit_out}"
export KIT_WHEELS="${KIT_WHEELS:-.whl}"
export KIT_SITE="${KIT_SITE:-/tmp/site}"
PARTS="${KIT_PARTS:-install,env,tests,bench,vllm}"
export OUT PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$KIT_SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MPO_GPU_KIT_OUT="$OUT"  # tests/gpu writes e2e_losses.json there
T_INSTALL="${KIT_T_INSTALL:-35}"
T_ENV="${KIT_T_ENV:-65}"
T_TESTS="${KIT_T_TESTS:-205}"
T_BENCH="${KIT_T_BENCH:-135}"
T_VLLM_LOOKUP="${KIT_T_VLLM_LOOKUP:-10}"
T_VLLM="${KIT_T_VLLM:-300}"
GRACE="${KIT_KILL_GRACE:-5}"  # SIGTERM at a step's limit, SIGKILL this much later
export KIT_KILL_GRACE="$GRACE"
export KIT_BENCH_BUDGET="${KIT_BENCH_BUDGET:-$((T_BENCH > 100 ? T_BENCH - 50 : T_BENCH / 2))}"

mkdir -p "$OUT" || exit 2
for f in summary.txt env.txt install.log tests.log junit.xml e2e_losses.json bench.log bench.json; do
    rm -f "${OUT:?}/$f"
done

part_install() {
    shopt -s nullglob
    local wheels=("$KIT_WHEELS"/*.whl)
    if [ "${#wheels[@]}" -eq 0 ]; then
        echo "error: no wheels in $KIT_WHEELS: run tools/gpu_kit/build_wheels.sh on a machine with network and carry the folder"
        return 1
    fi
    if [ -f "$KIT_WHEELS/SHA256SUMS" ]; then
        (cd "$KIT_WHEELS" && sha256sum -c --quiet SHA256SUMS) \
            || { echo "error: wheels in $KIT_WHEELS do not match their SHA256SUMS (damaged or stale copy)"; return 1; }
    fi
    ls -l "${wheels[@]}"
    if python3 -m pip --version > /dev/null 2>&1; then
        # Offline: no self-version check against an index, no prompts, no root warning.
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$KIT_SITE" "${wheels[@]}" || return 1
    else
        # These wheels have no .data or scripts: unpacking them is installing them.
        echo "pip is missing: unpacking the wheels into $KIT_SITE"
        mkdir -p "$KIT_SITE" || return 1
        local w
        for w in "${wheels[@]}"; do python3 -m zipfile -e "$w" "$KIT_SITE" || return 1; done
    fi
    # Found without importing torch (a cold first torch import can take tens of seconds;
    # the env part imports everything).
    python3 -c "import importlib.util as u, webdataset, braceexpand, packaging
spec = u.find_spec('megatron.core')
assert spec is not None, 'megatron.core not found on PYTHONPATH'
print('megatron.core found at', spec.origin, '| packaging', packaging.__version__)"
}

part_env() {
    echo "--- nvidia-smi"
    nvidia-smi || echo "(nvidia-smi missing or failed)"
    echo "--- python"
    python3 - <<'EOF'
import importlib.metadata as md
import importlib.util
import os
import sys

import torch


def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
for dist in ("megatron-core", "transformer-engine", "transformer_engine", "numpy", "transformers", "pytest",
             "webdataset", "packaging"):
    print(f"{dist}: {version(dist)}")
print("transformer_engine importable:", importlib.util.find_spec("transformer_engine") is not None)
import megatron.core  # noqa: E402

print("megatron.core", megatron.core.__version__, "from", megatron.core.__file__)
# What the fp32 comparisons rely on (tests/gpu/test_gpu.py also sets NVIDIA_TF32_OVERRIDE=0).
print("TF32: matmul.allow_tf32 =", torch.backends.cuda.matmul.allow_tf32,
      "| cudnn.allow_tf32 =", torch.backends.cudnn.allow_tf32,
      "| float32_matmul_precision =", torch.get_float32_matmul_precision(),
      "| matmul.fp32_precision =", getattr(torch.backends.cuda.matmul, "fp32_precision", "(no such setting)"),
      "| cudnn.conv.fp32_precision =", getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision",
                                                "(no such setting)"))
if not torch.cuda.is_available():
    allowed = os.environ.get("KIT_ALLOW_CPU") == "1"
    print("note: torch sees no CUDA GPU (KIT_ALLOW_CPU=1: dry run, not failing)" if allowed else "error: torch sees no CUDA GPU")
    sys.exit(0 if allowed else 3)  # 3: no GPU, nothing to probe
props = torch.cuda.get_device_properties(0)
print(f"GPU 0: {props.name}, capability {props.major}.{props.minor}, {props.total_memory / 2**30:.1f} GiB, "
      f"{torch.cuda.device_count()} visible, bf16 supported: {torch.cuda.is_bf16_supported()}")
a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
b = torch.randn(512, 512, generator=torch.Generator().manual_seed(1))
want = a @ b
got = (a.cuda().bfloat16() @ b.cuda().bfloat16()).float().cpu()
err = float((got - want).abs().max() / want.abs().max())
print(f"bf16 matmul on the GPU vs fp32 on the CPU: max error {err:.2e} of the largest entry")
sys.exit(0 if err < 2e-2 else 1)
EOF
    local rc=$? probe left
    [ "$rc" -eq 3 ] && return 1
    echo "--- torch.compile probe"
    # Bounded by what is left of this part's limit (KIT_PART_DEADLINE), kill grace included.
    left=$((KIT_PART_DEADLINE - $(date +%s) - KIT_KILL_GRACE - 2))
    if [ "$left" -lt 5 ]; then
        echo "compile probe: not run: ${left}s left of the env part's limit (raise KIT_T_ENV)"
        return 1
    fi
    local dry=()
    if [ "${KIT_ALLOW_CPU:-}" = 1 ]; then dry=(--cpu-dry-run); fi
    timeout -k "$KIT_KILL_GRACE" "$left" python3 tools/gpu_kit/compile_probe.py "${dry[@]}"
    probe=$?
    if [ "$probe" -eq 124 ] || [ "$probe" -eq 137 ]; then
        echo "compile probe: torch.compile: no result within ${left}s (killed)"
    fi
    [ "$rc" -eq 0 ] && [ "$probe" -eq 0 ]
}

part_tests() {
    # -v: one line per test as it ends, so a run cut by the time limit still shows what passed.
    # junit_logging=system-out: what each test printed (the numbers it compared) goes into junit.xml;
    # tests.gpu.kit_record rewrites junit.xml as tests end, so a killed run keeps it too.
    local tests=() select=()
    read -r -a tests <<< "${KIT_TESTS:-tests/gpu}"
    if [ -n "${KIT_TESTS_K:-}" ]; then select=(-k "$KIT_TESTS_K"); fi
    python3 -m pytest -v -m gpu "${tests[@]}" "${select[@]}" -p no:cacheprovider -p tests.gpu.kit_record \
        --durations=10 --ignore=tests/gpu/test_gpu_vllm.py \
        --junitxml="$OUT/junit.xml" -o junit_family=xunit2 -o junit_logging=system-out
}

part_bench() {
    local extra=()
    read -r -a extra <<< "${KIT_BENCH_ARGS:-}"
    python3 benchmarks/gpu_bench.py --out "$OUT/bench.json" --budget-s "$KIT_BENCH_BUDGET" "${extra[@]}"
}

part_vllm() {
    # -s: the comparison's numbers (the "vllm:" line) go to the log as they are printed.
    NVIDIA_TF32_OVERRIDE=0 VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}" \
        python3 -m pytest -v -s -rs -m gpu tests/gpu/test_gpu_vllm.py -p no:cacheprovider
}

export -f part_install part_env part_tests part_bench part_vllm

FAILED=()
record_part() {  # name, status, seconds, log file
    echo "=== [$1] $2 in ${3}s"
    printf '%-8s %s in %ss (log: %s)\n' "$1" "$2" "$3" "$(basename "$4")" >> "$OUT/summary.txt"
}

run_part() {  # name, time limit (s), log file[, "append" to add to an existing log]
    local name=$1 limit=$2 log=$3 mode=${4:-} start rc status
    local tee_args=("$log")
    [ "$mode" = append ] && tee_args=(-a "$log")
    start=$(date +%s)
    echo "=== [$name] start $(date -u +%H:%M:%S) UTC, limit ${limit}s, log $log"
    KIT_PART_DEADLINE=$((start + limit)) timeout -k "$GRACE" "$limit" bash -c "part_$name" 2>&1 | tee "${tee_args[@]}"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
        status="ok"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="FAILED (timed out after ${limit}s)"
    else
        status="FAILED (exit $rc)"
    fi
    [ "$rc" -eq 0 ] || FAILED+=("$name")
    record_part "$name" "$status" $(($(date +%s) - start)) "$log"
}

run_vllm() {
    # Looked up first, without importing it (or torch), under a short limit: the usual case
    # is a kit without vLLM, which then costs one line.
    local start rc
    start=$(date +%s)
    timeout -k "$GRACE" "$T_VLLM_LOOKUP" python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    rc=$?
    if [ "$rc" -eq 0 ]; then
        run_part vllm "$T_VLLM" "$OUT/tests.log" append
        return
    fi
    if [ "$rc" -ne 1 ]; then
        echo "error: could not tell within ${T_VLLM_LOOKUP}s whether vLLM is installed (exit $rc)" | tee -a "$OUT/tests.log"
        FAILED+=(vllm)
        record_part vllm "FAILED (vLLM lookup, exit $rc)" $(($(date +%s) - start)) "$OUT/tests.log"
        return
    fi
    echo "skipped: vLLM is not installed (it is not among the kit's wheels; carry it into $KIT_SITE to check the vllm engine)" \
        | tee -a "$OUT/tests.log"
    record_part vllm skipped $(($(date +%s) - start)) "$OUT/tests.log"
}

echo "GPU kit: repository $PWD, results in $OUT, parts $PARTS"
IFS=',' read -r -a wanted <<< "$PARTS"
for part in "${wanted[@]}"; do
    case "$part" in
        install) run_part install "$T_INSTALL" "$OUT/install.log" ;;
        env) run_part env "$T_ENV" "$OUT/env.txt" ;;
        tests) run_part tests "$T_TESTS" "$OUT/tests.log" ;;
        bench) run_part bench "$T_BENCH" "$OUT/bench.log" ;;
        # Appended to tests.log: the device machine returns at most 8 files.
        vllm) run_vllm ;;
        *) echo "error: unknown part '$part' in KIT_PARTS; use install, env, tests, bench, vllm"; exit 2 ;;
    esac
done

echo
echo "=============================== GPU kit summary ==============================="
cat "$OUT/summary.txt"
if [ -f "$OUT/env.txt" ]; then
    grep -E "^(compile probe:|note: the compile probe)" "$OUT/env.txt"
fi
if [ -f "$OUT/tests.log" ]; then
    echo "--- tests (last lines)"
    grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed|error|^skipped: vLLM" "$OUT/tests.log" | tail -n 15
    grep -oE "vllm: \{.*\}" "$OUT/tests.log" | tail -n 1  # pytest -v -s: after the test's name
fi
if [ -f "$OUT/e2e_losses.json" ]; then
    echo "--- training on the GPU vs the CPU (max relative difference of the per-step losses)"
    python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print(json.dumps(d['max_rel_diff_vs_cpu'])); print('ref_logratio_step0', d['ref_logratio_step0'])" "$OUT/e2e_losses.json"
fi
if [ -f "$OUT/bench.log" ]; then
    echo "--- benchmark (attention / layout / row length S)"
    grep -E "^\||peak |skipped|out of memory|Error" "$OUT/bench.log" | tail -n 30
fi
echo "--- files in $OUT"
ls -l "$OUT"
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "GPU kit: FAILED parts: ${FAILED[*]}"
    exit 1
fi
echo "GPU kit: all parts passed"
