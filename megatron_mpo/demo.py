"""The embedded-default demo: MPO visibly teaching a tiny InternVL to read colours, first
from given pairs, then from pairs built out of its own sampled answers (the paper's loop).

    megatron-mpo demo [--out runs/demo] [--steps N] [--self-steps N]     (or python -m megatron_mpo.demo)

Nothing is downloaded. The demo
1. draws a synthetic visual question set ("What color is the shape?"; chosen = the
   correct colour, rejected = a wrong one, each ending in "Final answer: <colour>") in MMPR
   format, plus held-out images; the same records, with their ``answer``, are a question set;
2. trains a tiny tokenizer, writes shards (``megatron-mpo shards``) and a randomly
   initialised tiny InternVL (``megatron-mpo init``);
3. precomputes reference log-probs and trains with MPO, both on 2 processes (TP=2,
   gloo on CPU), exactly as on a cluster;
4. samples 8 answers per question of a fresh question set from the trained model
   (``megatron-mpo sample``), scores them and builds correctness pairs
   (``megatron-mpo pairs``), shards them and runs one more MPO round from the trained
   checkpoint on them;
5. reports held-out answer accuracy (engine + scorer), reward-margin accuracy and per-token
   log-prob accuracy before training, after it and after the round on its own pairs
   (``megatron-mpo evaluate`` at TP=2), and plots the training curves to a PNG.

Each step runs as ``python -m megatron_mpo.cli COMMAND``: the installed command's code,
without depending on where the console script went.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from megatron_mpo.console import exit_on_user_error, failure_line
from megatron_mpo.errors import UserError

REPO = Path(__file__).resolve().parents[1]
_CLI = ("-m", "megatron_mpo.cli")  # the megatron-mpo command, through this interpreter
COLORS = ("red", "green", "blue", "yellow")
QUESTION = "<image>\nWhat color is the shape in the image?"


RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}


def draw_shape(size: int, rng: random.Random):
    """A large square or circle of a random colour on a light background (slightly jittered)."""
    from PIL import Image, ImageDraw

    color, shape = rng.choice(COLORS), rng.choice(("square", "circle"))
    img = Image.new("RGB", (size, size), tuple(rng.randint(225, 255) for _ in range(3)))
    side = int(size * rng.uniform(0.7, 0.9))
    x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
    fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in RGB[color])
    box = (x0, y0, x0 + side - 1, y0 + side - 1)
    (ImageDraw.Draw(img).rectangle if shape == "square" else ImageDraw.Draw(img).ellipse)(box, fill=fill)
    return img, color, shape


def write_color_set(out: Path, count: int, seed: int, image_size: int, unanswered_every: int = 0) -> Path:
    """Images with one coloured shape and MMPR records (chosen: right colour, rejected: wrong).

    ``unanswered_every``: every so many records carry no ``answer`` (as a question set, they
    go to Dropout NTP)."""
    rng = random.Random(seed)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        img, color, shape = draw_shape(image_size, rng)
        name = f"{seed}_{i:05d}.png"
        img.save(images / name)
        wrong = rng.choice([c for c in COLORS if c != color])
        rows.append({
            "id": f"{seed}-{i}", "image": name, "question": QUESTION,
            "chosen": f"The {shape} is {color}. Final answer: {color}",
            "rejected": f"The {shape} is {wrong}. Final answer: {wrong}",
            "answer": color, "choices": list(COLORS),
        })
        if unanswered_every and i % unanswered_every == unanswered_every - 1:
            del rows[-1]["answer"]
    annotation = out / "colors.jsonl"
    annotation.write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = out / "meta.json"
    meta.write_text(json.dumps({"colors": {"root": "images", "annotation": "colors.jsonl",
                                           "repeat_time": 1, "length": count}}))
    # The same records as a question set (answer: the colour), scored by normalised exact match.
    (out / "questions.json").write_text(json.dumps({"colors": {"root": "images", "annotation": "colors.jsonl",
                                                               "scoring": "vqa"}}))
    return meta


def _run(cmd: list[str], log_path: Path, what: str) -> None:
    """Run a stage in its own process(es), logging to a file; stop with one line on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # known-harmless warnings: megatron_mpo/console.py
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if proc.returncode != 0:
        why = failure_line(log_path.read_text())
        raise UserError(f"{what} failed (exit {proc.returncode}): {why} -- full log: {log_path}")
    print(f"  {what}: done in {time.perf_counter() - started:.0f}s (log: {log_path})", flush=True)


def _torchrun(nproc: int, *target: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *target]


def _train_config(out: Path, name: str, init: Path, shards: Path, refs: Path, steps: int, nproc: int, seed: int,
                  lr: float, tokenizer: Path) -> Path:
    """A CPU training config (TP = nproc) written to ``out/{name}.yaml``."""
    config = {
        "model": {"init": str(init), "tokenizer": str(tokenizer)},
        "parallel": {"tensor": nproc},
        "data": {"shards": str(shards), "ref_logps": str(refs), "max_length": 256, "max_tiles": 1,
                 "num_workers": 1, "shuffle_buffer": 256, "seed": seed},
        "mpo": {"beta": 0.1},
        "train": {"global_batch": 16, "micro_batch": 8, "steps": steps, "lr": lr, "min_lr": lr / 10,
                  "warmup": 0.05, "weight_decay": 0.0, "clip_grad": 1.0, "seed": seed, "device": "cpu"},
        "checkpoint": {"save": str(out / f"checkpoints_{name}"), "interval": max(steps, 1), "keep_last": 1},
        "logging": {"metrics": str(out / f"metrics_{name}.jsonl"), "interval": 5},
    }
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train(out: Path, config_path: Path, name: str, steps: int, nproc: int, logs: Path, what: str) -> Path:
    """Reference values, then MPO training from scratch of the run dir; the final checkpoint."""
    cfg = yaml.safe_load(config_path.read_text())
    _run(_torchrun(nproc, *_CLI, "reference", "--config", str(config_path)),
         logs / f"reference_{name}.log", f"reference log-probs for {what} (TP={nproc})")
    Path(cfg["logging"]["metrics"]).unlink(missing_ok=True)
    shutil.rmtree(cfg["checkpoint"]["save"], ignore_errors=True)
    _run(_torchrun(nproc, *_CLI, "train", "--config", str(config_path)), logs / f"train_{name}.log",
         f"{what}, {steps} steps (TP={nproc})")
    return Path(cfg["checkpoint"]["save"]) / f"step_{steps:09d}"


def _evaluate(out: Path, ckpt: Path, name: str, heldout: Path, nproc: int, logs: Path, what: str) -> dict:
    """Held-out answer accuracy (engine + scorer) and preference accuracy (at TP = nproc)."""
    result_dir = out / f"eval_{name}"
    shutil.rmtree(result_dir, ignore_errors=True)
    _run(_torchrun(nproc, *_CLI, "evaluate", "--ckpt", str(ckpt), "--out", str(result_dir),
                   "--questions", str(heldout / "questions.json"), "--prompt", "plain", "--max-new-tokens", "40",
                   "-k", "8",
                   "--shards", str(out / "heldout_shards"), "--ref-logps", str(out / "heldout_refs"),
                   "--tensor-parallel", str(nproc), "--micro-batch", "8", "--max-length", "256", "--max-tiles", "1",
                   "--device", "cpu"),
         logs / f"eval_{name}.log", f"held-out evaluation {what}")
    return json.loads((result_dir / "eval.json").read_text())


def run_demo(out: Path, steps: int, train_pairs: int, heldout: int, nproc: int = 2, seed: int = 0,
             self_steps: int = 80, self_questions: int = 256, samples: int = 8, evaluate_before: bool = True) -> dict:
    from megatron_mpo.data.tiny_tokenizer import build_tiny_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    image_size = 56  # the tiny preset's tile size: one tile per image
    print(f"demo: writing data, tokenizer and a tiny InternVL into {out}", flush=True)
    meta = write_color_set(out / "data" / "train", train_pairs, seed + 1, image_size)
    heldout_meta = write_color_set(out / "data" / "heldout", heldout, seed + 2, image_size)
    tok = out / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        build_tiny_tokenizer(str(tok))
    for source, shards in ((meta, out / "shards"), (heldout_meta, out / "heldout_shards")):
        if not (shards / "index.json").is_file():
            _run([sys.executable, *_CLI, "shards", "--meta", str(source), "--out", str(shards),
                  "--samples-per-shard", "64", "--seed", str(seed)], logs / f"make_{shards.name}.log", "make shards")
    init = out / "init"
    if not (init / "model_config.json").is_file():
        _run([sys.executable, *_CLI, "init", "--preset", "tiny", "--tokenizer", str(tok),
              "--out", str(init), "--seed", str(seed)], logs / "init.log", "initial checkpoint")
    # The held-out pairs' reference values: the initial model's (preference accuracy is a margin over them).
    heldout_cfg = _train_config(out, "heldout", init, out / "heldout_shards", out / "heldout_refs", 1, nproc, seed,
                                1e-3, tok)
    _run(_torchrun(nproc, *_CLI, "reference", "--config", str(heldout_cfg)),
         logs / "reference_heldout.log", f"held-out reference log-probs (TP={nproc})")

    config_path = _train_config(out, "mpo", init, out / "shards", out / "refs", steps, nproc, seed, 3.0e-3, tok)
    (out / "config.yaml").write_text(config_path.read_text())
    final = _train(out, config_path, "mpo", steps, nproc, logs, "MPO training on the given pairs")
    results = {}
    if evaluate_before:
        results["before"] = _evaluate(out, init, "before", out / "data" / "heldout", nproc, logs, "before training")
    results["after"] = _evaluate(out, final, "after", out / "data" / "heldout", nproc, logs, "after MPO")

    if self_steps > 0:  # the paper's loop: pairs from the model's own samples, one more MPO round
        questions = write_color_set(out / "data" / "own", self_questions, seed + 3, image_size, 8).parent
        own = out / "own"
        _run([sys.executable, *_CLI, "sample", "--questions", str(questions / "questions.json"),
              "--model", str(final), "--out", str(own / "samples"), "-n", str(samples), "--prompt", "plain",
              "--max-new-tokens", "40", "--max-length", "256", "--max-tiles", "1", "--seed", str(seed),
              "--device", "cpu", "--part-size", "32"],
             logs / "sample.log", f"sampling {samples} answers per question from the trained model")
        _run([sys.executable, *_CLI, "pairs", "--samples", str(own / "samples"), "--out",
              str(own / "pairs"), "--overwrite"], logs / "pairs.log", "correctness pairs from its own answers")
        _run([sys.executable, *_CLI, "shards", "--meta", str(own / "pairs" / "meta.json"), "--out",
              str(own / "shards"), "--samples-per-shard", "64", "--seed", str(seed), "--overwrite"],
             logs / "make_own_shards.log", "make shards of its own pairs")
        own_cfg = _train_config(own, "round", final, own / "shards", own / "refs", self_steps, nproc, seed, 3.0e-3, tok)
        improved = _train(own, own_cfg, "round", self_steps, nproc, logs, "MPO round on its own pairs")
        results["own_round"] = _evaluate(out, improved, "own_round", out / "data" / "heldout", nproc, logs,
                                         "after the round on its own pairs")
        results["own_pairs"] = json.loads((own / "pairs" / "summary.json").read_text())

    from megatron_mpo.plotting import plot_runs

    plot = plot_runs([out / "metrics_mpo.jsonl"], out / "training_curves.png", ["demo"])

    def acc(name: str) -> dict:
        r = results[name]
        return {"answer": r["answers"]["overall"]["greedy_accuracy"],
                "sampled": r["answers"]["overall"]["sampled_accuracy"],
                "preference": r["preference"]["reward_accuracy"],
                "per_token": r["preference"]["per_token_logp_accuracy"]}

    summary = {
        **{f"{stage}": acc(stage) for stage in ("before", "after", "own_round") if stage in results},
        "heldout_samples": results["after"]["preference"]["pairs"],
        "own_pairs": results.get("own_pairs"),
        "plot": str(plot),
        "examples_after": results["own_round" if "own_round" in results else "after"]["answers"]["datasets"]["colors"]
        ["examples"][:2],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


@exit_on_user_error
def main(argv=None, prog=None) -> None:
    parser = argparse.ArgumentParser(prog=prog, description="CPU demo: MPO on a tiny InternVL, nothing to download.")
    parser.add_argument("--out", default="runs/demo", help="work directory (default runs/demo)")
    parser.add_argument("--steps", type=int, default=60, help="MPO steps on the given pairs")
    parser.add_argument("--train-pairs", type=int, default=512)
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--self-steps", type=int, default=80,
                        help="then one MPO round of this many steps on pairs built from the model's own samples "
                             "(0: skip)")
    parser.add_argument("--self-questions", type=int, default=256, help="questions the model answers for that round")
    parser.add_argument("--samples", type=int, default=8, help="answers sampled per question")
    parser.add_argument("--skip-before", action="store_true", help="do not evaluate the untrained model")
    parser.add_argument("--nproc", type=int, default=2, help="processes = tensor-parallel size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    s = run_demo(Path(args.out), args.steps, args.train_pairs, args.heldout, args.nproc, args.seed,
                 args.self_steps, args.self_questions, args.samples, not args.skip_before)
    stages = [k for k in ("before", "after", "own_round") if k in s]
    titles = {"before": "before", "after": "after MPO", "own_round": "+own pairs"}
    rows = [("greedy-answer accuracy", "answer"), ("sampled-answer accuracy", "sampled"),
            ("reward-margin accuracy", "preference"),
            ("per-token log-prob acc.", "per_token")]
    table = f"held-out ({s['heldout_samples']} images)".ljust(28) + "".join(titles[k].rjust(12) for k in stages)
    for title, key in rows:
        table += "\n  " + title.ljust(26) + "".join(f"{s[k][key]:12.1%}" for k in stages)
    own = s.get("own_pairs")
    if own:
        table += (f"\nown pairs: {own['pairs']} correctness + {own['dropout_ntp_pairs']} Dropout NTP from "
                  f"{own['questions']} questions ({own['all_correct']} all right, "
                  f"{own['all_wrong']} all wrong, {own['no_final_answer']} samples without a final answer)")
    print(f"\n{table}\ntraining curves: {s['plot']}\nexamples after training: "
          + "; ".join(f"{e['answer']} -> {e['generated']!r}" for e in s["examples_after"])
          + f"\ndemo finished in {time.perf_counter() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main()
