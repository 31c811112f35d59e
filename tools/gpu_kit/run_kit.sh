#!/usr/bin/env bash
# Check a GPU machine that has no network, in one command from the repository root:
#
#     tools/gpu_kit/run_kit.sh
#
# Parts, in order (each one runs even when an earlier one failed; the exit status is
# non-zero when any failed, and summary.txt says which):
#   install  the wheels of .whl/ (tools/gpu_kit/build_wheels.sh) into /tmp/site, offline
#   env      nvidia-smi, torch / CUDA / megatron-core / Transformer Engine versions, TF32
#            defaults, a bf16 matmul on the GPU checked against the CPU
#   tests    python -m pytest -q -m gpu tests/gpu (per-test time limits, see tests/gpu/conftest.py;
#            the numbers a test compared, e.g. FlexAttention against SDPA, are in junit.xml's
#            system-out), all but tests/gpu/test_gpu_vllm.py (the vllm part)
#   bench    benchmarks/gpu_bench.py: InternVL2-2B (random init, bf16) step time, tokens/s, MFU,
#            peak memory per attention (FlexAttention, per-pair SDPA, TE's own when installed)
#            x layout (packed rows of several pairs, unpacked causal rows) x row length
#            (4k, 8k, 12k); bench.json is rewritten after every configuration, and no new
#            configuration starts once KIT_BENCH_BUDGET seconds have passed
#   vllm     tests/gpu/test_gpu_vllm.py: the vllm generation engine against the transformers
#            engine (greedy, float32, token for token), sampling reproducibility and samples/s
#            (the line starting "vllm:"), appended to tests.log. vLLM is not among the kit's
#            wheels: without an importable vllm the part is "skipped" (one line, well under a
#            second); carry vLLM and its dependencies into KIT_SITE to run it
# Results (at most 8 files) go to $OUT (default /tmp/gpu_kit_out): summary.txt, env.txt,
# install.log, tests.log, junit.xml, e2e_losses.json (GPU vs CPU loss curves), bench.log,
# bench.json. Budget on an H200 (estimated; the kit has not run on one yet): about 30 s
# install, 20 s env, 3-4 min tests (FlexAttention compiles included), 2-2.5 min bench
# (2 model builds, 9 configurations, one FlexAttention compile per row length); each part
# has a hard limit (below): 45 + 75 + 250 + 170 s, so the whole kit ends within 9 minutes
# while vLLM is absent. With vLLM the vllm part adds up to KIT_T_VLLM (300 s; estimated 1-3
# min, mostly vLLM's start): run it on its own then, KIT_PARTS=install,env,vllm.
#
# Settings (environment): OUT, KIT_WHEELS (.whl), KIT_SITE (/tmp/site), KIT_PARTS
# (install,env,tests,bench,vllm), KIT_BENCH_ARGS (extra gpu_bench.py arguments, e.g.
# "--steps 2 --row-lengths 4096,8192"), KIT_ALLOW_CPU=1 (dry run without a GPU: env does
# not fail), limits in seconds KIT_T_INSTALL (45), KIT_T_ENV (75), KIT_T_TESTS (250),
# KIT_T_BENCH (170), KIT_BENCH_BUDGET (KIT_T_BENCH - 50: the longest configuration, a 12k
# row with its FlexAttention compile, must still end inside the bench's limit), KIT_T_VLLM
# (300). A part that exits 77 is reported "skipped", not failed.
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
OUT="${OUT:-/tmp/gpu_kit_out}"
export KIT_WHEELS="${KIT_WHEELS:-.whl}"
export KIT_SITE="${KIT_SITE:-/tmp/site}"
PARTS="${KIT_PARTS:-install,env,tests,bench,vllm}"
export OUT PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$KIT_SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MPO_GPU_KIT_OUT="$OUT"  # tests/gpu writes e2e_losses.json there
T_INSTALL="${KIT_T_INSTALL:-45}"
T_ENV="${KIT_T_ENV:-75}"
T_TESTS="${KIT_T_TESTS:-250}"
T_BENCH="${KIT_T_BENCH:-170}"
T_VLLM="${KIT_T_VLLM:-300}"
SKIPPED=77  # a part that has nothing to check here
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
      "| float32_matmul_precision =", torch.get_float32_matmul_precision())
if not torch.cuda.is_available():
    allowed = os.environ.get("KIT_ALLOW_CPU") == "1"
    print("note: torch sees no CUDA GPU (KIT_ALLOW_CPU=1: dry run, not failing)" if allowed else "error: torch sees no CUDA GPU")
    sys.exit(0 if allowed else 1)
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
}

part_tests() {
    # -v: one line per test as it ends, so a run cut by the time limit still shows what passed.
    # junit_logging=system-out: what each test printed (the numbers it compared) goes into junit.xml.
    python3 -m pytest -v -m gpu tests/gpu -p no:cacheprovider --durations=10 \
        --ignore=tests/gpu/test_gpu_vllm.py \
        --junitxml="$OUT/junit.xml" -o junit_family=xunit2 -o junit_logging=system-out
}

part_bench() {
    local extra=()
    read -r -a extra <<< "${KIT_BENCH_ARGS:-}"
    python3 benchmarks/gpu_bench.py --out "$OUT/bench.json" --budget-s "$KIT_BENCH_BUDGET" "${extra[@]}"
}

part_vllm() {
    # Found without importing it (or torch): the usual case is a kit without vLLM.
    if ! python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"; then
        echo "skipped: vLLM is not installed (it is not among the kit's wheels; carry it into $KIT_SITE to check the vllm engine)"
        return 77  # $SKIPPED (not exported to the part's shell)
    fi
    # -s: the comparison's numbers (the "vllm:" line) go to the log as they are printed.
    NVIDIA_TF32_OVERRIDE=0 VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-WARNING}" \
        python3 -m pytest -v -s -rs -m gpu tests/gpu/test_gpu_vllm.py -p no:cacheprovider
}

export -f part_install part_env part_tests part_bench part_vllm

FAILED=()
run_part() {  # name, time limit (s), log file[, "append" to add to an existing log]
    local name=$1 limit=$2 log=$3 mode=${4:-} start rc status took
    local tee_args=("$log")
    [ "$mode" = append ] && tee_args=(-a "$log")
    start=$(date +%s)
    echo "=== [$name] start $(date -u +%H:%M:%S) UTC, limit ${limit}s, log $log"
    timeout -k 10 "$limit" bash -c "part_$name" 2>&1 | tee "${tee_args[@]}"
    rc=${PIPESTATUS[0]}
    took=$(($(date +%s) - start))
    if [ "$rc" -eq 0 ]; then
        status="ok"
    elif [ "$rc" -eq "$SKIPPED" ]; then
        status="skipped"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="FAILED (timed out after ${limit}s)"
    else
        status="FAILED (exit $rc)"
    fi
    [ "$rc" -eq 0 ] || [ "$rc" -eq "$SKIPPED" ] || FAILED+=("$name")
    echo "=== [$name] $status in ${took}s"
    printf '%-8s %s in %ss (log: %s)\n' "$name" "$status" "$took" "$(basename "$log")" >> "$OUT/summary.txt"
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
        vllm) run_part vllm "$T_VLLM" "$OUT/tests.log" append ;;
        *) echo "error: unknown part '$part' in KIT_PARTS; use install, env, tests, bench, vllm"; exit 2 ;;
    esac
done

echo
echo "=============================== GPU kit summary ==============================="
cat "$OUT/summary.txt"
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
