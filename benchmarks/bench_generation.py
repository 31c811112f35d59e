#!/usr/bin/env python
"""Generation throughput: the transformers engine (KV cache, a question's n samples batched)
vs the project's old KV-less greedy loop, tokens/s at a fixed number of new tokens.

    python benchmarks/bench_generation.py --workdir /tmp/bgen --reps 3 --new-tokens 64,256 \
        --sizes tiny,bench --out benchmarks/results/DATE_generation.json
    python benchmarks/bench_generation.py --table benchmarks/results/DATE_generation.json

Sides, on the same weights, the same prompt (one question + one image of the model's tile
size, built by the training prompt rule: ``build_pair_builder(...)`` + ``build_prompt``):

* ``engine``: ``make_engine("transformers", HF_DIR, tok, device="cpu")`` +
  ``SamplingSettings(n=SAMPLES, temperature=1.0, max_new_tokens=N)`` on one prompt, i.e.
  one ``generate`` call on a batch of SAMPLES rows with a KV cache (top-k 50 sampling, the
  engine's defaults). To force exactly N new tokens per row, the model's ``generate`` gets
  ``min_new_tokens=N`` (EOS / end-of-turn masked until then); everything else is the
  engine's own call.
* ``baseline``: the pre-engine loop, ``Evaluator._logits`` + ``Evaluator.greedy`` of
  ``megatron_mpo/evaluate.py`` at commit 87a9ec1 (copied below, :class:`OldGreedyLoop`):
  the project's megatron-core model at TP=1 (``spec="local"``, arbitrary attention mask),
  every new token recomputes the whole prefix, images included, one sequence at a time.
  It can neither sample nor batch, so SAMPLES answers are SAMPLES sequential greedy runs
  (``--baseline-seqs`` may time fewer of them, see below); it does not stop at EOS here
  (N new tokens exactly). Generated tokens are counted on both sides (the engine's
  ``Completion.tokens``, checked to be N per row).

Models: ``tiny`` = the demo's model (``tools/init_checkpoint.py --preset tiny`` with the
tiny tokenizer; 56 px tiles, 4 image tokens per tile); ``bench`` = the model
``benchmarks/bench_mpo.py --size bench`` trains (a random
``transformers.InternVLForConditionalGeneration`` of ``bench_mpo.SIZES["bench"]``, ~27M
parameters, 448 px tiles, 256 image tokens per tile, converted with
``tools/convert_hf_to_megatron.py``). Both Megatron directories are exported with
``tools/convert_megatron_to_hf.py`` (native layout) for the engine, so both sides load the
same weights through the project's converter.

Each side of each size runs in its own subprocess: ``parallel.initialize`` installs a
process-wide CPU ``TorchFunctionMode`` (megatron_mpo/platform.py) that the baseline pays
for, as the old evaluator did, and that must not tax the engine. In each process: load,
one untimed warm-up call (engine: SAMPLES rows x 8 new tokens; baseline: 1 sequence x 8
new tokens), then ``--reps`` timed calls per length. tokens/s = generated tokens / wall
time of the call (prompt processing included on both sides). Medians over the reps.

Shared machines: each timed window records the CPU time other processes used (share of
all cores). A *noisy* run (more than ``--quiet-threshold``, default 10 %) is repeated up
to ``--quiet-retries`` times within ``--retry-budget-s`` seconds per side and size, and the
quietest attempt is kept (every attempt is in the JSON). ``--resume`` reuses a side's
result from WORKDIR when its settings match and all its kept runs were quiet, so the same
command can be rerun until every side was measured quietly (each side records when it
finished). ``--threads`` sets torch's threads per process (default: torch's own).

``--baseline-seqs SIZE=K``: time only K of the SAMPLES sequential greedy runs for that
size (the K runs are identical: same prompt, greedy), and report tokens/s of those
(tokens/s of a sequential loop does not depend on how many runs it does); the default
does this for ``bench`` only, where 8 x 256 full-prefix forwards of a 27M model would
take far longer than the rest of the benchmark.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform as py_platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()
BASELINE_COMMIT = "87a9ec1746f11465bebb80d77d22431fd702d396"
QUESTION = "<image>\nDescribe the image in detail. What shape is in the image, and what colour is it?"
WARMUP_TOKENS = 8
DEFAULT_BASELINE_SEQS = "tiny=8,bench=1"
SCRIPT_VERSION = 2


def log(msg: str) -> None:
    print(f"[bench-gen] {msg}", flush=True)


def child_env() -> dict:
    """bench_mpo's environment for child processes (offline, unbuffered)."""
    sys.path.insert(0, str(THIS.parent))
    from bench_mpo import child_env as bench_env

    return bench_env()


def run_tool(args: List[str]) -> None:
    proc = subprocess.run([sys.executable] + args, env=child_env(), cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


# ---- workspace ---------------------------------------------------------------------------------


def prepare(size: str, workdir: Path) -> Dict[str, str]:
    """Tokenizer, Megatron model dir and its native HF export for one size (cached)."""
    ws = workdir / size
    paths = {"tokenizer": str(ws / "tokenizer"), "megatron": str(ws / "megatron"), "hf": str(ws / "hf")}
    marker = ws / "prepared.json"
    settings = {"size": size, "version": 1}
    if marker.is_file() and json.loads(marker.read_text()).get("settings") == settings:
        log(f"{size}: reusing {ws}")
        return json.loads(marker.read_text())["paths"]
    import shutil

    if ws.exists():
        shutil.rmtree(ws)
    ws.mkdir(parents=True)
    from megatron_mpo.data.tiny_tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(paths["tokenizer"])
    if size == "tiny":  # the demo's model (megatron_mpo/demo.py)
        run_tool([str(REPO / "tools/init_checkpoint.py"), "--preset", "tiny", "--tokenizer", paths["tokenizer"],
                  "--out", paths["megatron"]])
    elif size == "bench":  # bench_mpo.py --size bench: same config, built the same way
        build_bench_hf(ws / "hf_source", paths["tokenizer"])
        run_tool([str(REPO / "tools/convert_hf_to_megatron.py"), "--hf", str(ws / "hf_source"),
                  "--out", paths["megatron"]])
    else:
        raise SystemExit(f"unknown size {size!r}: tiny or bench")
    run_tool([str(REPO / "tools/convert_megatron_to_hf.py"), "--ckpt", paths["megatron"], "--out", paths["hf"]])
    marker.write_text(json.dumps({"settings": settings, "paths": paths}, indent=1))
    log(f"{size}: prepared {ws}")
    return paths


def build_bench_hf(out: Path, tokenizer_dir: str, seed: int = 0) -> None:
    """bench_mpo.build_workspace's model, size ``bench`` (model part only)."""
    import shutil

    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    sys.path.insert(0, str(THIS.parent))
    from bench_mpo import SIZES

    from megatron_mpo.data import load_tokenizer

    spec = SIZES["bench"]
    tok = load_tokenizer(tokenizer_dir)
    vision = dict(spec["vision"], patch_size=14, attention_bias=True, norm_type="layer_norm", use_qk_norm=False,
                  layer_scale_init_value=0.1)
    text = dict(spec["text"], model_type="qwen2", vocab_size=tok.vocab_size, max_position_embeddings=16384,
                rope_theta=1e6, rms_norm_eps=1e-6, eos_token_id=tok.im_end_id, pad_token_id=tok.pad_id)
    tokens_per_tile = (spec["vision"]["image_size"] // 14) ** 2 // 4
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tok.img_context_id,
                            image_seq_length=tokens_per_tile, downsample_ratio=0.5, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    out.mkdir(parents=True)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), out / name)
    model.save_pretrained(str(out))


# ---- the prompt ----------------------------------------------------------------------------------


def make_prompt(megatron_dir: str, tok):
    """One question + one image of the model's tile size, by the training prompt rule."""
    from PIL import Image, ImageDraw

    from megatron_mpo.training.model_dir import read_model_config
    from megatron_mpo.data import DataConfig
    from megatron_mpo.data.samples import build_pair_builder
    from megatron_mpo.generation.prompts import build_prompt
    from megatron_mpo.training.data_setup import default_template

    config = read_model_config(megatron_dir)
    px = config.vision.image_size
    img = Image.new("RGB", (px, px), (240, 240, 235))
    ImageDraw.Draw(img).ellipse([px // 5, px // 5, 4 * px // 5, 4 * px // 5], fill=(200, 30, 30))
    png = io.BytesIO()
    img.save(png, format="PNG")
    data = DataConfig(max_length=4096, max_tiles=6, template=default_template(config))
    builder = build_pair_builder(data, tok, image_size=px, tokens_per_tile=config.tokens_per_tile)
    return config, build_prompt(builder, "bench-q0", QUESTION, [png.getvalue()])


# ---- baseline: the pre-engine loop -----------------------------------------------------------------


class OldGreedyLoop:
    """The pre-engine greedy loop: ``Evaluator.__init__`` (model part), ``Evaluator._logits`` and
    ``Evaluator.greedy`` of ``megatron_mpo/evaluate.py`` at commit 87a9ec1 (``git show
    87a9ec1:megatron_mpo/evaluate.py``), copied because that file is being rewritten.

    No KV cache: each new token runs the whole prefix (and the image) through the model.
    Two changes for the benchmark, both flagged below: ``force`` does not stop at
    end-of-turn / EOS (fixed-length timing), and the image tokens (``<img>``, ``</img>``,
    ``<IMG_CONTEXT>``) are excluded from the argmax as the engine suppresses them (a
    random model that picked ``<IMG_CONTEXT>`` would desynchronise the image features).
    """

    def __init__(self, ckpt: str, tok) -> None:
        from megatron_mpo import parallel
        from megatron_mpo.training.model_dir import read_model_config
        from megatron_mpo.models.internvl import build_model
        from megatron_mpo.training.checkpoint import load_model_weights

        parallel.initialize(1, 1, seed=0, device="cpu")
        self.config = read_model_config(ckpt)
        self.model = build_model(self.config, spec="local", attention_mask="arbitrary")
        load_model_weights(ckpt, [self.model])
        self.model.eval()
        self.tok = tok
        self.never = [i for i in (tok.img_start_id, tok.img_end_id, tok.img_context_id)
                      if i is not None and i < tok.vocab_size]

    def _logits(self, ids: List[int], pixel_values):
        import torch

        from megatron_mpo import platform
        from megatron_mpo.segments import causal_mask

        with torch.no_grad():
            dev = platform.device()
            input_ids = torch.tensor([ids], device=dev)
            is_image = input_ids == self.tok.img_context_id
            index = torch.full_like(input_ids, -1)
            index[is_image] = torch.arange(int(is_image.sum()), device=dev)
            return self.model(
                input_ids=input_ids,
                position_ids=torch.arange(len(ids), device=dev).unsqueeze(0),
                attention_mask=causal_mask(len(ids)).to(dev),
                labels=None,
                pixel_values=pixel_values.to(dev),
                image_token_index=index,
            )

    def greedy(self, prompt: List[int], pixel_values, max_new_tokens: int = 16, force: bool = True) -> List[int]:
        """The new token ids (the old method decoded them to text; decoding is left out of the timing)."""
        ids = list(prompt)
        for _ in range(max_new_tokens):
            logits = self._logits(ids, pixel_values)[0, -1, : self.tok.vocab_size]
            logits[self.never] = float("-inf")  # benchmark change: never an image token
            nxt = int(logits.argmax())
            if not force and nxt in (self.tok.im_end_id, self.tok.eos_id):  # benchmark change: `not force`
                break
            ids.append(nxt)
        return ids[len(prompt):]


# ---- workers -------------------------------------------------------------------------------------


def _busy_cpu_s(psutil) -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


class Window:
    """Wall time, own CPU time and other processes' CPU share of one timed call."""

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()

    def __enter__(self) -> "Window":
        self.busy0 = _busy_cpu_s(self.psutil)
        c = self.me.cpu_times()
        self.own0 = c.user + c.system
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        c = self.me.cpu_times()
        own = c.user + c.system - self.own0
        busy = _busy_cpu_s(self.psutil) - self.busy0
        cores = self.psutil.cpu_count() or 1
        self.own_cpu_s = own
        self.foreign_share = max(0.0, busy - own) / (self.wall * cores) if self.wall > 0 else None


def force_new_tokens(engine, n: int) -> None:
    """Make the engine's ``generate`` produce exactly ``n`` tokens per row (EOS masked until then)."""
    model = engine.model
    original = type(model).generate

    def generate(*args, **kwargs):
        kwargs.setdefault("min_new_tokens", kwargs.get("max_new_tokens", n))
        return original(model, *args, **kwargs)

    model.generate = generate  # instance attribute: what engine._run calls


def worker(args) -> None:
    import torch

    from megatron_mpo.console import setup_console
    from megatron_mpo.data import load_tokenizer

    setup_console()  # the project's filter of known-harmless megatron-core / torch notices
    if args.threads:
        torch.set_num_threads(args.threads)

    paths = json.loads(args.paths)
    tok = load_tokenizer(paths["tokenizer"])
    config, prompt = make_prompt(paths["megatron"], tok)
    lengths = [int(x) for x in args.new_tokens.split(",")]
    t_load = time.perf_counter()
    if args.worker == "engine":
        from megatron_mpo.generation.engines import SamplingSettings, make_engine

        engine = make_engine("transformers", paths["hf"], tok, device="cpu")
        force_new_tokens(engine, 0)

        def call(n_new: int) -> int:
            out = engine.generate([prompt], SamplingSettings(n=args.samples, temperature=1.0, max_new_tokens=n_new))
            counts = [c.tokens for c in out[0]]
            if counts != [n_new] * args.samples:
                raise SystemExit(f"engine generated {counts} tokens, expected {n_new} per row")
            return sum(counts)
        rows = args.samples
    else:
        old = OldGreedyLoop(paths["megatron"], tok)
        rows = int(args.baseline_seqs)

        def call(n_new: int, seqs: Optional[int] = None) -> int:
            total = 0
            for _ in range(seqs or rows):
                new = old.greedy(prompt.ids, prompt.pixel_values, n_new)
                if len(new) != n_new:
                    raise SystemExit(f"baseline generated {len(new)} tokens, expected {n_new}")
                total += len(new)
            return total
    load_s = time.perf_counter() - t_load

    with Window() as w:  # warm-up, untimed in the results
        call(WARMUP_TOKENS) if args.worker == "engine" else call(WARMUP_TOKENS, 1)
    runs, attempts, retry_spent = [], [], 0.0
    for n_new in lengths:
        for rep in range(args.reps):
            tries = []
            while True:
                with Window() as w:
                    tokens = call(n_new)
                run = {"new_tokens": n_new, "rep": rep, "attempt": len(tries), "tokens": tokens, "seconds": w.wall,
                       "tokens_per_s": tokens / w.wall, "own_cpu_s": w.own_cpu_s,
                       "foreign_cpu_share": w.foreign_share}
                tries.append(run)
                noisy = (w.foreign_share or 0) > args.quiet_threshold
                log(f"{args.size} {args.worker} N={n_new} rep {rep}.{run['attempt']}: {tokens} tokens in "
                    f"{w.wall:.2f}s = {tokens / w.wall:.1f} tok/s (other processes: "
                    f"{100 * (w.foreign_share or 0):.0f}% CPU{', noisy' if noisy else ''})")
                # A noisy run (other processes took CPU) is repeated while the retry budget lasts.
                if not noisy or len(tries) > args.quiet_retries or retry_spent + w.wall > args.retry_budget_s:
                    break
                retry_spent += w.wall
            attempts += tries
            runs.append(dict(min(tries, key=lambda r: r["foreign_cpu_share"] or 0), attempts=len(tries)))
    params = None
    if args.worker == "engine":
        params = sum(p.numel() for p in engine.model.parameters())
    result = {"size": args.size, "side": args.worker, "settings": json.loads(args.settings), "rows": rows, "prompt_tokens": len(prompt.ids),
              "image_tokens": sum(1 for i in prompt.ids if i == tok.img_context_id), "tiles": prompt.num_tiles,
              "load_s": load_s, "torch_threads": torch.get_num_threads(), "params": params,
              "quiet_threshold": args.quiet_threshold, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "runs": runs, "all_attempts": attempts}
    Path(args.result).write_text(json.dumps(result, indent=1))


# ---- parent ----------------------------------------------------------------------------------------


def parse_seqs(text: str) -> Dict[str, int]:
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = int(value)
    return out


def summarize(results: List[dict]) -> List[dict]:
    rows = []
    by = {(r["size"], r["side"]): r for r in results}
    for size in dict.fromkeys(r["size"] for r in results):
        eng, old = by.get((size, "engine")), by.get((size, "baseline"))
        lengths = sorted({run["new_tokens"] for r in (eng, old) if r for run in r["runs"]})
        for n in lengths:
            row = {"size": size, "new_tokens": n}
            for name, r in (("engine", eng), ("baseline", old)):
                runs = [x for x in (r["runs"] if r else []) if x["new_tokens"] == n]
                row[f"{name}_tok_s"] = statistics.median(x["tokens_per_s"] for x in runs) if runs else None
                row[f"{name}_reps"] = len(runs)
                row[f"{name}_rows"] = r["rows"] if r else None
                row[f"{name}_max_foreign_cpu"] = max((x["foreign_cpu_share"] or 0) for x in runs) if runs else None
                row[f"{name}_quiet_reps"] = sum((x["foreign_cpu_share"] or 0) <= r["quiet_threshold"] for x in runs) \
                    if runs else None
                row[f"{name}_median_s"] = statistics.median(x["seconds"] for x in runs) if runs else None
            if row["engine_tok_s"] and row["baseline_tok_s"]:
                row["speedup"] = row["engine_tok_s"] / row["baseline_tok_s"]
            row["prompt_tokens"] = (eng or old)["prompt_tokens"]
            rows.append(row)
    return rows


def markdown(rows: List[dict], samples: int) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"| model | prompt tokens | new tokens | engine tok/s ({samples} sampled rows, one call) | "
             "baseline tok/s (sequential greedy, no KV cache) | speed-up | "
             f"s per question ({samples} answers): engine / baseline | quiet reps: engine / baseline | "
             "max other-CPU share |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_q = r["baseline_median_s"] * samples / r["baseline_rows"] if r["baseline_median_s"] else None
        foreign = max((x for x in (r["engine_max_foreign_cpu"], r["baseline_max_foreign_cpu"]) if x is not None),
                      default=0.0)
        timed = "" if r["baseline_rows"] == samples else f" ({r['baseline_rows']} of {samples} timed)"
        lines.append(f"| {r['size']} | {r['prompt_tokens']} | {r['new_tokens']} | {num(r['engine_tok_s'], '.1f')} | "
                     f"{num(r['baseline_tok_s'], '.2f')}{timed} | {num(r.get('speedup'), '.1f')}x | "
                     f"{num(r['engine_median_s'], '.2f')} / {num(per_q, '.1f')} | "
                     f"{r['engine_quiet_reps']}/{r['engine_reps']} / {r['baseline_quiet_reps']}/{r['baseline_reps']} | "
                     f"{100 * foreign:.0f}% |")
    return "\n".join(lines)


def machine() -> dict:
    import psutil
    import torch
    import transformers

    try:
        import megatron.core as mc
        mcore = getattr(mc, "__version__", None)
    except Exception:
        mcore = None
    cpu = py_platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": psutil.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__,
            "megatron_core": mcore, "python": py_platform.python_version(), "loadavg_start": os.getloadavg()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/bgen")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--new-tokens", default="64,256", help="comma-separated lengths, forced on both sides")
    p.add_argument("--sizes", default="tiny,bench")
    p.add_argument("--samples", type=int, default=8, help="samples per question (engine batch rows)")
    p.add_argument("--baseline-seqs", default=DEFAULT_BASELINE_SEQS,
                   help="SIZE=K: sequential greedy runs timed per call (default: all SAMPLES for tiny, 1 for bench)")
    p.add_argument("--sides", default="engine,baseline")
    p.add_argument("--quiet-threshold", type=float, default=0.10,
                   help="a run is noisy when other processes used more than this share of all cores")
    p.add_argument("--quiet-retries", type=int, default=2, help="repeats of a noisy run (the quietest is kept)")
    p.add_argument("--retry-budget-s", type=float, default=60.0, help="seconds of repeats per side and size")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (default: torch's own)")
    p.add_argument("--resume", action="store_true",
                   help="reuse a side's result from WORKDIR when its settings match and all its kept runs were "
                        "quiet (rerun the same command on a shared machine until every side is quiet)")
    p.add_argument("--out", help="result JSON (default WORKDIR/results.json)")
    p.add_argument("--table", help="print the table of a saved result JSON and exit")
    # internal: one side of one size
    p.add_argument("--worker", choices=["engine", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--paths", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.table:
        saved = json.loads(Path(args.table).read_text())
        print(markdown(saved["summary"], saved["settings"]["samples"]))
        return
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    seqs = {k: min(v, args.samples) for k, v in parse_seqs(args.baseline_seqs).items()}
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    started = time.time()
    info = machine()
    log(f"machine: {info}")
    results = []
    for size in sizes:
        paths = prepare(size, workdir)
        for side in [s.strip() for s in args.sides.split(",") if s.strip()]:
            out = workdir / size / f"result_{side}.json"
            settings = {"new_tokens": args.new_tokens, "reps": args.reps, "samples": args.samples,
                        "baseline_seqs": seqs.get(size, args.samples), "threads": args.threads,
                        "quiet_threshold": args.quiet_threshold, "script_version": SCRIPT_VERSION}
            if args.resume and out.is_file():
                done = json.loads(out.read_text())
                if done.get("settings") == settings and all(
                        (r["foreign_cpu_share"] or 0) <= args.quiet_threshold for r in done["runs"]):
                    log(f"{size} {side}: reusing {out} (same settings, every kept run quiet)")
                    results.append(done)
                    continue
            cmd = [sys.executable, str(THIS), "--worker", side, "--size", size, "--paths", json.dumps(paths),
                   "--settings", json.dumps(settings), "--threads", str(args.threads or 0),
                   "--result", str(out), "--reps", str(args.reps), "--new-tokens", args.new_tokens,
                   "--samples", str(args.samples), "--baseline-seqs", str(seqs.get(size, args.samples)),
                   "--quiet-threshold", str(args.quiet_threshold), "--quiet-retries", str(args.quiet_retries),
                   "--retry-budget-s", str(args.retry_budget_s)]
            log(f"{size} {side}: running")
            proc = subprocess.run(cmd, env=child_env(), cwd=REPO)
            if proc.returncode != 0:
                raise SystemExit(f"{size} {side} failed (exit {proc.returncode})")
            results.append(json.loads(out.read_text()))
    rows = summarize(results)
    info["loadavg_end"] = os.getloadavg()
    table = markdown(rows, args.samples)
    print(table)
    saved = {"settings": {"sizes": sizes, "new_tokens": args.new_tokens, "reps": args.reps, "samples": args.samples,
                          "baseline_seqs": {s: seqs.get(s, args.samples) for s in sizes},
                          "warmup_tokens": WARMUP_TOKENS, "baseline_commit": BASELINE_COMMIT,
                          "quiet_threshold": args.quiet_threshold, "quiet_retries": args.quiet_retries,
                          "retry_budget_s": args.retry_budget_s, "threads": args.threads or None,
                          "resume": args.resume,
                          "command": " ".join([Path(sys.executable).name, "benchmarks/bench_generation.py"]
                                              + (argv if argv is not None else sys.argv[1:]))},
             "machine": info, "wall_s": time.time() - started, "summary": rows, "results": results}
    out = Path(args.out) if args.out else workdir / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(saved, indent=1))
    log(f"wrote {out} ({time.time() - started:.0f}s)")


if __name__ == "__main__":
    main()
