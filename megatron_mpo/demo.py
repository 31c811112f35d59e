"""The embedded-default demo: MPO visibly teaching a tiny InternVL to read colours.

    python -m megatron_mpo.demo [--out runs/demo] [--steps N] [--quick]

Nothing is downloaded. The demo
1. draws a synthetic visual question set ("What color is the shape?"; chosen = the
   correct colour, rejected = a wrong one) in MMPR format, plus held-out images;
2. trains a tiny tokenizer, writes shards (tools/make_shards.py) and a randomly
   initialised tiny InternVL (tools/init_checkpoint.py);
3. precomputes reference log-probs and trains with MPO, both on 2 processes (TP=2,
   gloo on CPU), exactly as on a cluster;
4. reports greedy-answer and preference accuracy on held-out images before and after
   training, and plots the training curves to a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

from megatron_mpo.console import failure_line
from megatron_mpo.errors import UserError, exit_on_user_error

REPO = Path(__file__).resolve().parents[1]
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


def write_color_set(out: Path, count: int, seed: int, image_size: int) -> Path:
    """Images with one coloured shape and MMPR records (chosen: right colour, rejected: wrong)."""
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
            "chosen": f"The {shape} is {color}.", "rejected": f"The {shape} is {wrong}.",
            "answer": color, "choices": list(COLORS),
        })
    annotation = out / "colors.jsonl"
    annotation.write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = out / "meta.json"
    meta.write_text(json.dumps({"colors": {"root": "images", "annotation": "colors.jsonl",
                                           "repeat_time": 1, "length": count}}))
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


def run_demo(out: Path, steps: int, train_pairs: int, heldout: int, nproc: int = 2, seed: int = 0) -> dict:
    from megatron_mpo.data.tiny_tokenizer import build_tiny_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    image_size = 56  # the tiny preset's tile size: one tile per image
    print(f"demo: writing data, tokenizer and a tiny InternVL into {out}", flush=True)
    meta = write_color_set(out / "data" / "train", train_pairs, seed + 1, image_size)
    write_color_set(out / "data" / "heldout", heldout, seed + 2, image_size)
    tok = out / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        build_tiny_tokenizer(str(tok))
    shards = out / "shards"
    if not (shards / "index.json").is_file():
        _run([sys.executable, str(REPO / "tools/make_shards.py"), "--meta", str(meta), "--out", str(shards),
              "--samples-per-shard", "64", "--seed", str(seed)], logs / "make_shards.log", "make shards")
    init = out / "init"
    if not (init / "model_config.json").is_file():
        _run([sys.executable, str(REPO / "tools/init_checkpoint.py"), "--preset", "tiny", "--tokenizer", str(tok),
              "--out", str(init), "--seed", str(seed)], logs / "init.log", "initial checkpoint")

    config = {
        "model": {"init": str(init)},
        "parallel": {"tensor": nproc},
        "data": {"shards": str(shards), "ref_logps": str(out / "refs"), "max_length": 256, "max_tiles": 1,
                 "num_workers": 1, "shuffle_buffer": 256, "seed": seed},
        "mpo": {"beta": 0.1},
        "train": {"global_batch": 16, "micro_batch": 8, "steps": steps, "lr": 3.0e-3, "min_lr": 3.0e-4,
                  "warmup": 0.05, "weight_decay": 0.0, "clip_grad": 1.0, "seed": seed, "device": "cpu"},
        "checkpoint": {"save": str(out / "checkpoints"), "interval": max(steps, 1), "keep_last": 1},
        "logging": {"metrics": str(out / "metrics.jsonl"), "interval": 5},
    }
    config_path = out / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    _run(_torchrun(nproc, str(REPO / "tools/precompute_ref_logps.py"), "--config", str(config_path)),
         logs / "reference.log", f"reference log-probs (TP={nproc})")
    if (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    for old in (out / "checkpoints").glob("*") if (out / "checkpoints").is_dir() else []:
        import shutil

        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    _run(_torchrun(nproc, "-m", "megatron_mpo.train", "--config", str(config_path)), logs / "train.log",
         f"MPO training, {steps} steps (TP={nproc})")
    final = out / "checkpoints" / f"step_{steps:09d}"

    records = out / "data" / "heldout" / "colors.jsonl"
    results = {}
    for name, ckpt in (("before", init), ("after", final)):
        result_path = out / f"eval_{name}.json"
        _run([sys.executable, "-m", "megatron_mpo.evaluate", "--ckpt", str(ckpt), "--records", str(records),
              "--image-root", str(records.parent / "images"), "--max-tiles", "1", "--max-new-tokens", "8", "--out", str(result_path)],
             logs / f"eval_{name}.log", f"held-out evaluation {name} training")
        results[name] = json.loads(result_path.read_text())

    from megatron_mpo.plotting import plot_runs

    plot = plot_runs([out / "metrics.jsonl"], out / "training_curves.png", ["demo"])
    summary = {
        "greedy_accuracy_before": results["before"]["greedy_accuracy"],
        "greedy_accuracy_after": results["after"]["greedy_accuracy"],
        "preference_accuracy_before": results["before"]["preference_accuracy"],
        "preference_accuracy_after": results["after"]["preference_accuracy"],
        "heldout_samples": results["after"]["samples"],
        "plot": str(plot),
        "examples_after": results["after"]["examples"][:2],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="CPU demo: MPO on a tiny InternVL, nothing to download.")
    parser.add_argument("--out", default="runs/demo", help="work directory (default runs/demo)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--train-pairs", type=int, default=1024)
    parser.add_argument("--heldout", type=int, default=64)
    parser.add_argument("--nproc", type=int, default=2, help="processes = tensor-parallel size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    s = run_demo(Path(args.out), args.steps, args.train_pairs, args.heldout, args.nproc, args.seed)
    print(
        f"\nheld-out ({s['heldout_samples']} images)   before    after\n"
        f"  greedy-answer accuracy   {s['greedy_accuracy_before']:6.1%}   {s['greedy_accuracy_after']:6.1%}\n"
        f"  preference accuracy      {s['preference_accuracy_before']:6.1%}   {s['preference_accuracy_after']:6.1%}\n"
        f"training curves: {s['plot']}\nexamples after training: "
        + "; ".join(f"{e['answer']} -> {e['generated']!r}" for e in s["examples_after"])
        + f"\ndemo finished in {time.perf_counter() - started:.0f}s",
        flush=True,
    )


if __name__ == "__main__":
    main()
