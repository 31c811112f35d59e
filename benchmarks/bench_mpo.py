#!/usr/bin/env python
"""MPO throughput and memory: this trainer vs TRL's DPOTrainer, same model, same pairs.

    python benchmarks/bench_mpo.py [--size bench] [--reps 3] [--steps 6] [--warmup-steps 2]
                                   [--sides ours,ours-unpacked,trl] [--workdir DIR] [--out FILE]

One run does everything, in this order, each piece in its own subprocess:

1. workspace (once per ``--workdir`` and settings): a tiny tokenizer, a random
   ``transformers.InternVLForConditionalGeneration`` (``--size bench``: InternViT-style
   vision 192 wide x 4 layers at 448 px, Qwen2-style LLM 512 wide x 8 layers; ~27M
   parameters, fp32) saved with ``save_pretrained``, converted to a Megatron model
   directory with ``tools/convert_hf_to_megatron.py`` -- so both trainers start from the
   very same weights -- and synthetic MMPR pairs: one 896x448 image per pair (2 tiles +
   thumbnail = 3 tiles = 768 image tokens), a question, a chosen and a rejected answer
   (~130 / ~100 tokens), written as WebDataset shards with ``tools/make_shards.py``;
2. the reference tool ``tools/precompute_ref_logps.py`` (timed and reported on its own:
   a one-off cost per dataset);
3. for each side, ``--reps`` runs of ``--steps`` optimizer steps of ``--global-batch``
   pairs (micro-batch ``--micro-batch``):

   * ``ours``: ``python -m megatron_mpo.train --config ...`` (single process, TP=1,
     shared-prompt packing -- the default), ``ours-unpacked``: the same with
     ``data.packing=false``, ``ours-recompute``: packed with ``model.recompute=full``
     (activation recomputation, the counterpart of TRL's gradient checkpointing);
   * ``trl``: TRL's ``DPOTrainer`` with ``loss_type=["sigmoid", "bco_pair", "sft"]``,
     ``loss_weights=[0.8, 0.2, 1.0]``, ``beta=0.1``, fp32, on the HF model directory,
     the same images / prompts / answers (same chat template text), gradient
     checkpointing off (its fastest setting; ``trl-gc`` runs TRL's default, on).
     TRL keeps a live reference model (it refuses ``precompute_ref_log_probs`` for
     vision data).

Throughput counts steady-state steps only: the parent stamps the moment each step's
end line arrives on the child's stdout and divides the pairs of steps
``warmup+1 .. steps`` by the time between the end of step ``warmup`` and the end of the
last step (start-up, model loading, the first steps and shutdown are excluded, alike on
both sides). Peak memory is the peak, over the whole child run, of the summed RSS of the
child's process tree (trainer + data-loader workers), polled every 0.1 s; the summed PSS
(shared pages split between processes) is reported beside it. Medians over the
repetitions are printed as a Markdown table and written as JSON.

TRL, transformers and datasets are benchmark-only dependencies (``pip install -e .[bench]``);
without TRL the ``trl`` sides are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()

MPO_LOSS_TYPES = ["sigmoid", "bco_pair", "sft"]
MPO_LOSS_WEIGHTS = [0.8, 0.2, 1.0]
BETA = 0.1

# ---- model / data sizes --------------------------------------------------------------------

SIZES = {
    # ~27M parameters: InternViT-300M-like vision (LayerNorm, qkv bias) at 448 px, 256
    # tokens per tile after the pixel shuffle; Qwen2-like LLM (GQA, qkv bias, RMSNorm).
    "bench": dict(
        vision=dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                    image_size=448),
        text=dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=1408),
        image_wh=(896, 448),  # 2x1 grid + thumbnail = 3 tiles
        chosen_tokens=130,
        rejected_tokens=100,
    ),
    # Seconds per step, for the smoke test: 56 px tiles (4 tokens per tile).
    "smoke": dict(
        vision=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=56),
        text=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128),
        image_wh=(112, 56),
        chosen_tokens=24,
        rejected_tokens=18,
    ),
}

QUESTION = "<image>\nDescribe the image in detail. Then answer the question: what shape is in the image?"


# ---- small helpers ---------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("WANDB_DISABLED", "true")
    return env


def trl_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("trl", "datasets", "transformers"))


@dataclass
class RunResult:
    side: str
    rep: int
    returncode: int
    wall_s: float
    step_times: list  # child-time of each step end (s since launch), in order
    pairs_per_s: Optional[float]
    peak_rss_mb: float
    peak_pss_mb: Optional[float]
    log: str
    extra: dict = field(default_factory=dict)


class TreeMemory:
    """Polls the summed RSS (and PSS) of a process and all its descendants."""

    def __init__(self, pid: int, interval: float = 0.1, pss_every: int = 5):
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid)
        self.interval = interval
        self.pss_every = pss_every
        self.peak_rss = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "TreeMemory":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _procs(self):
        try:
            return [self.root] + self.root.children(recursive=True)
        except self._psutil.Error:
            return []

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            rss = pss = 0
            procs = self._procs()
            for p in procs:
                try:
                    if tick % self.pss_every == 0:
                        info = p.memory_full_info()
                        rss += info.rss
                        pss += info.pss
                    else:
                        rss += p.memory_info().rss
                except self._psutil.Error:
                    continue
            self.peak_rss = max(self.peak_rss, rss)
            if tick % self.pss_every == 0:
                self.peak_pss = max(self.peak_pss, pss)
            tick += 1
            self._stop.wait(self.interval)


def _busy_cpu_s(psutil) -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def _tree_cpu_s(root) -> float:
    total = 0.0
    try:
        procs = [root] + root.children(recursive=True)
    except Exception:
        return total
    for p in procs:
        try:
            c = p.cpu_times()
            total += c.user + c.system
        except Exception:
            continue
    return total


def run_child(cmd: list, log_path: Path, step_prefix: str, timeout: float) -> tuple:
    """Run ``cmd``; stamp lines starting with ``step_prefix``.

    Returns (rc, wall, stamps, rss, pss, text, load): ``stamps`` are seconds since launch
    at which each step line arrived; ``load`` holds, per stamp, the machine's busy CPU
    seconds and the child tree's CPU seconds (to tell how much other processes ran)."""
    import psutil

    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(),
                        cwd=REPO, bufsize=1)
    mem = TreeMemory(proc.pid).start()
    stamps: list = []
    load: list = []
    lines: list = []

    def reader():
        for line in proc.stdout:
            now = time.perf_counter() - start
            lines.append(line)
            if line.startswith(step_prefix):
                stamps.append(now)
                load.append((_busy_cpu_s(psutil), _tree_cpu_s(proc)))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    t.join()
    wall = time.perf_counter() - start
    mem.stop()
    text = "".join(lines)
    log_path.write_text(text)
    return rc, wall, stamps, mem.peak_rss / 2**20, (mem.peak_pss / 2**20 if mem.peak_pss else None), text, load


def pairs_per_cpu_s(load: list, warmup: int, steps: int, pairs_per_step: int) -> Optional[float]:
    """Steady-state pairs per CPU-second the child tree actually got (robust to other load)."""
    if len(load) < steps or warmup < 1:
        return None
    used = load[steps - 1][1] - load[warmup - 1][1]
    return (steps - warmup) * pairs_per_step / used if used > 0 else None


def foreign_cpu_share(stamps: list, load: list, warmup: int, steps: int) -> Optional[float]:
    """Share of the machine's CPUs used by *other* processes during the timed window."""
    if len(load) < steps or warmup < 1:
        return None
    (busy0, tree0), (busy1, tree1) = load[warmup - 1], load[steps - 1]
    window = stamps[steps - 1] - stamps[warmup - 1]
    if window <= 0:
        return None
    return max(0.0, (busy1 - busy0) - (tree1 - tree0)) / (window * (os.cpu_count() or 1))


def steady_pairs_per_s(stamps: list, steps: int, warmup: int, pairs_per_step: int) -> Optional[float]:
    if len(stamps) < steps or steps <= warmup:
        return None
    measured = steps - warmup
    elapsed = stamps[steps - 1] - stamps[warmup - 1] if warmup > 0 else None
    if elapsed is None or elapsed <= 0:
        return None
    return measured * pairs_per_step / elapsed


# ---- workspace -------------------------------------------------------------------------------


def _response_text(target_tokens: int, tok, rng: random.Random, lead: str) -> str:
    """English sentences (from the tiny tokenizer's corpus) until ~target_tokens tokens."""
    from megatron_mpo.data.tiny_tokenizer import corpus_lines

    sentences = corpus_lines()
    text = lead
    while len(tok.encode(text)) < target_tokens:
        text += " " + rng.choice(sentences)
    # Trim words from the end to land close to the target.
    words = text.split(" ")
    while len(words) > 1 and len(tok.encode(" ".join(words))) > target_tokens:
        words.pop()
    return " ".join(words)


def build_workspace(ws: Path, size: str, num_pairs: int, seed: int, vocab: Optional[int] = None) -> dict:
    """Tokenizer + HF model + converted Megatron dir + shards + the same pairs for TRL."""
    settings = {"size": size, "pairs": num_pairs, "seed": seed, "version": 2}
    if vocab:
        settings["vocab"] = vocab
    marker = ws / "workspace.json"
    if marker.is_file() and json.loads(marker.read_text()).get("settings") == settings:
        log(f"reusing workspace {ws}")
        return json.loads(marker.read_text())
    if ws.exists():
        shutil.rmtree(ws)
    ws.mkdir(parents=True)
    spec = SIZES[size]

    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from megatron_mpo.data import load_tokenizer
    from megatron_mpo.data.synthetic import draw_image
    from megatron_mpo.data.tiny_tokenizer import build_tiny_tokenizer

    hf = ws / "hf"
    build_tiny_tokenizer(str(hf))
    tok = load_tokenizer(str(hf))
    vision = dict(spec["vision"], patch_size=14, attention_bias=True, norm_type="layer_norm", use_qk_norm=False,
                  layer_scale_init_value=0.1)
    text = dict(spec["text"], model_type="qwen2", vocab_size=max(tok.vocab_size, vocab or 0), max_position_embeddings=4096,
                rope_theta=1e6, rms_norm_eps=1e-6, eos_token_id=tok.im_end_id, pad_token_id=tok.pad_id)
    tokens_per_tile = (spec["vision"]["image_size"] // 14) ** 2 // 4
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tok.img_context_id,
                            image_seq_length=tokens_per_tile, downsample_ratio=0.5, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    params = sum(p.numel() for p in model.parameters())
    vision_params = sum(p.numel() for p in model.model.vision_tower.parameters())
    model.save_pretrained(str(hf))
    del model
    log(f"HF model: {params / 1e6:.1f}M parameters ({vision_params / 1e6:.1f}M vision) -> {hf}")

    proc = subprocess.run([sys.executable, str(REPO / "tools/convert_hf_to_megatron.py"), "--hf", str(hf),
                           "--out", str(ws / "megatron")], env=child_env(), cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"conversion failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")

    # Synthetic MMPR pairs: one image of 2+ tiles each, long answers of realistic relative length.
    raw = ws / "raw"
    (raw / "images").mkdir(parents=True)
    rng = random.Random(seed)
    w, h = spec["image_wh"]
    records = []
    for i in range(num_pairs):
        img, color, shape = draw_image(w, h, seed * 1000 + i)
        name = f"img_{i:05d}.jpg"
        img.save(raw / "images" / name, quality=90)
        wrong = "circle" if shape == "square" else "square"
        chosen = _response_text(spec["chosen_tokens"], tok, rng, f"The image shows a {color} {shape}.")
        rejected = _response_text(spec["rejected_tokens"], tok, rng, f"The image shows a {color} {wrong}.")
        records.append({"id": f"bench-{i}", "image": name, "question": QUESTION, "chosen": chosen,
                        "rejected": rejected})
    with open(raw / "pairs.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    meta = {"bench": {"root": "images", "annotation": "pairs.jsonl", "repeat_time": 1, "length": len(records)}}
    (raw / "meta.json").write_text(json.dumps(meta))
    proc = subprocess.run([sys.executable, str(REPO / "tools/make_shards.py"), "--meta", str(raw / "meta.json"),
                           "--out", str(ws / "shards"), "--samples-per-shard", str(max(1, num_pairs // 2)),
                           "--workers", "1", "--quiet"], env=child_env(), cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"make_shards failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")

    info = {"settings": settings, "params": params, "vision_params": vision_params,
            "tokens_per_tile": tokens_per_tile, "image_wh": [w, h], "refs": None}
    marker.write_text(json.dumps(info, indent=1))
    return info


def token_lengths(ws: Path) -> dict:
    """Prompt / chosen / rejected lengths as this trainer tokenizes them (mean over pairs)."""
    from megatron_mpo.data import load_tokenizer
    from megatron_mpo.data.samples import PairBuilder
    from megatron_mpo.data.templates import get_template
    from megatron_mpo.models.config import InternVLConfig
    from megatron_mpo.training.data_setup import default_template

    mc = InternVLConfig.from_json((ws / "megatron" / "model_config.json").read_text())
    tok = load_tokenizer(str(ws / "megatron"))
    builder = PairBuilder(tok, get_template(default_template(mc)), max_length=100000, max_tiles=6,
                          image_size=mc.vision.image_size, tokens_per_tile=mc.tokens_per_tile)
    out = {"prompt": [], "chosen": [], "rejected": []}
    w, h = json.loads((ws / "workspace.json").read_text())["image_wh"]
    from megatron_mpo.data.tiling import count_tiles

    tiles = count_tiles(w, h, mc.vision.image_size, 6)
    for line in (ws / "raw" / "pairs.jsonl").read_text().splitlines():
        r = json.loads(line)
        out["prompt"].append(len(builder.prompt_ids(r["question"], [tiles])))
        out["chosen"].append(len(builder.response_ids(r["chosen"])))
        out["rejected"].append(len(builder.response_ids(r["rejected"])))
    return {k: statistics.mean(v) for k, v in out.items()} | {"tiles": tiles, "image_tokens": tiles * mc.tokens_per_tile}


# ---- our side --------------------------------------------------------------------------------


def ours_config(ws: Path, args, packing: bool, metrics: Optional[Path], steps: int,
                recompute: Optional[str] = None) -> dict:
    return {
        "model": {"init": str(ws / "megatron"), "recompute": recompute},
        "data": {
            "shards": str(ws / "shards"),
            "ref_logps": str(ws / "refs"),
            "max_length": 4096,
            "max_tiles": 6,
            "num_workers": args.num_workers,
            "shuffle_buffer": 16,
            "packing": packing,
        },
        "train": {"global_batch": args.global_batch, "micro_batch": args.micro_batch, "steps": steps,
                  "lr": 1.0e-6, "min_lr": 0.0, "warmup": 0, "schedule": "constant", "weight_decay": 0.05,
                  "clip_grad": 1.0, "device": "cpu", "seed": args.seed},
        "mpo": {"beta": BETA, "weights": {"preference": MPO_LOSS_WEIGHTS[0], "quality": MPO_LOSS_WEIGHTS[1],
                                           "generation": MPO_LOSS_WEIGHTS[2]}},
        "logging": {"metrics": str(metrics) if metrics else None, "interval": 1},
    }


def write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_reference(ws: Path, args) -> dict:
    """tools/precompute_ref_logps.py over all pairs (timed; sidecars into ws/refs)."""
    if (ws / "refs").exists():
        shutil.rmtree(ws / "refs")
    cfg = write_yaml(ws / "configs" / "ref.yaml", ours_config(ws, args, True, None, 1))
    rc, wall, _, rss, pss, text, _ = run_child([sys.executable, str(REPO / "tools/precompute_ref_logps.py"),
                                             "--config", str(cfg)], ws / "logs" / "reference.log", "\0",
                                            args.timeout)
    if rc != 0:
        raise SystemExit(f"reference tool failed (rc {rc}):\n{text[-4000:]}")
    pairs = json.loads((ws / "workspace.json").read_text())["settings"]["pairs"]
    return {"wall_s": wall, "pairs": pairs, "pairs_per_s_incl_startup": pairs / wall, "peak_rss_mb": rss,
            "peak_pss_mb": pss}


def run_ours(ws: Path, args, side: str, rep: int) -> RunResult:
    packing = side != "ours-unpacked"
    recompute = "full" if side == "ours-recompute" else None
    metrics = ws / "runs" / f"{side}_{rep}.jsonl"
    if metrics.exists():
        metrics.unlink()
    cfg = write_yaml(ws / "configs" / f"{side}.yaml",
                     ours_config(ws, args, packing, metrics, args.steps, recompute))
    cmd = [sys.executable, "-m", "megatron_mpo.train", "--config", str(cfg)]
    rc, wall, stamps, rss, pss, text, load = run_child(cmd, ws / "logs" / f"{side}_{rep}.log", "step ", args.timeout)
    extra = {"foreign_cpu_share": foreign_cpu_share(stamps, load, args.warmup_steps, args.steps),
             "pairs_per_cpu_s": pairs_per_cpu_s(load, args.warmup_steps, args.steps, args.global_batch),
             "load": load}
    if metrics.is_file():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        steady = [r for r in rows if r["step"] > args.warmup_steps]
        if steady:
            extra["internal_pairs_per_s"] = statistics.median(r["samples_per_s"] for r in steady)
            extra["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in steady)
            extra["mfu"] = statistics.median(r["mfu"] for r in steady)
            extra["loss_last"] = rows[-1]["loss"]
            extra["tokens_per_step"] = statistics.median(r["tokens_per_s"] / r["samples_per_s"] * args.global_batch
                                                         for r in steady)
    return RunResult(side, rep, rc, wall, stamps,
                     steady_pairs_per_s(stamps, args.steps, args.warmup_steps, args.global_batch),
                     rss, pss, str(ws / "logs" / f"{side}_{rep}.log"), extra)


# ---- TRL side --------------------------------------------------------------------------------


def run_trl(ws: Path, args, side: str, rep: int) -> RunResult:
    spec = {
        "ws": str(ws), "steps": args.steps, "global_batch": args.global_batch, "micro_batch": args.micro_batch,
        "seed": args.seed, "gradient_checkpointing": side == "trl-gc", "out": str(ws / "runs" / f"{side}_{rep}"),
        "lm_head": args.trl_lm_head,
    }
    cmd = [sys.executable, str(THIS), "_trl_worker", json.dumps(spec)]
    rc, wall, stamps, rss, pss, text, load = run_child(cmd, ws / "logs" / f"{side}_{rep}.log", "BENCH_STEP ",
                                                       args.timeout)
    extra = {"foreign_cpu_share": foreign_cpu_share(stamps, load, args.warmup_steps, args.steps),
             "pairs_per_cpu_s": pairs_per_cpu_s(load, args.warmup_steps, args.steps, args.global_batch),
             "load": load}
    for line in text.splitlines():
        if line.startswith("BENCH_BATCH "):
            extra["first_batch"] = json.loads(line[len("BENCH_BATCH "):])
        if line.startswith("BENCH_LOSS "):
            extra["loss_last"] = float(line.split()[1])
    return RunResult(side, rep, rc, wall, stamps,
                     steady_pairs_per_s(stamps, args.steps, args.warmup_steps, args.global_batch),
                     rss, pss, str(ws / "logs" / f"{side}_{rep}.log"), extra)


def trl_worker(spec: dict) -> None:
    """Runs inside the child process: TRL DPOTrainer with the MPO loss mix."""
    import warnings

    warnings.filterwarnings("ignore")
    import datasets
    import torch
    from transformers import InternVLForConditionalGeneration, InternVLProcessor, PreTrainedTokenizerFast, TrainerCallback
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    from trl import DPOConfig, DPOTrainer

    from megatron_mpo.data.templates import IMAGE_PLACEHOLDER, IMG_CONTEXT, get_template
    from megatron_mpo.models.config import InternVLConfig
    from megatron_mpo.training.data_setup import default_template

    ws = Path(spec["ws"])
    hf = ws / "hf"
    mc = InternVLConfig.from_json((ws / "megatron" / "model_config.json").read_text())
    template = get_template(default_template(mc))  # the very template our side renders

    class Processor(InternVLProcessor):
        # Without torchvision no video processor class can be resolved; images need none.
        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    tokenizer = PreTrainedTokenizerFast.from_pretrained(
        str(hf), extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                       "context_image_token": IMG_CONTEXT, "video_token": "<quad>"})
    image_processor = GotOcr2ImageProcessorPil(
        crop_to_patches=True, min_patches=1, max_patches=6,
        size={"height": mc.vision.image_size, "width": mc.vision.image_size})
    processor = Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=mc.tokens_per_tile)

    rows = [json.loads(x) for x in (ws / "raw" / "pairs.jsonl").read_text().splitlines() if x.strip()]
    data = {
        "images": [[str(ws / "raw" / "images" / r["image"])] for r in rows],
        # Same prompt text as our side; InternVLProcessor expands <IMG_CONTEXT> to <img> + tokens + </img>.
        "prompt": [template.render_prompt(r["question"].replace(IMAGE_PLACEHOLDER, IMG_CONTEXT)) for r in rows],
        "chosen": [template.render_response(r["chosen"]) for r in rows],
        "rejected": [template.render_response(r["rejected"]) for r in rows],
    }
    dataset = datasets.Dataset.from_dict(data).cast_column("images", datasets.List(datasets.Image()))

    model = InternVLForConditionalGeneration.from_pretrained(str(hf), dtype=torch.float32)
    if spec.get("lm_head", "compact") == "compact":
        # TRL's fused LM head projects only the labelled (completion) positions where Triton runs (GPUs) and
        # every position elsewhere (this CPU). Give it the GPU behaviour: the kernels stay torch ops.
        import trl.trainer.utils as trl_utils

        trl_utils._use_triton = lambda device: True

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            print(f"BENCH_STEP {state.global_step}", flush=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                print(f"BENCH_LOSS {logs['loss']}", flush=True)

    micro, global_batch = spec["micro_batch"], spec["global_batch"]
    config = DPOConfig(
        output_dir=spec["out"],
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=global_batch // micro,
        max_steps=spec["steps"],
        learning_rate=1.0e-6,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.05,
        max_grad_norm=1.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        beta=BETA,
        loss_type=MPO_LOSS_TYPES,
        loss_weights=MPO_LOSS_WEIGHTS,
        max_length=None,  # no truncation: image tokens must stay
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=spec["gradient_checkpointing"],
        dataloader_num_workers=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=spec["seed"],
        disable_tqdm=True,
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=processor,
                         callbacks=[Stamp()])
    collate = trainer.data_collator
    seen = {"done": False}

    def recording_collator(examples):
        batch = collate(examples)
        if not seen["done"]:
            seen["done"] = True
            ids = batch["input_ids"]
            info = {"rows": int(ids.shape[0]), "seq": int(ids.shape[1]), "tiles": int(batch["pixel_values"].shape[0]),
                    "image_tokens_per_row": int((ids[0] == mc.img_context_token_id).sum()),
                    "completion_tokens": batch["completion_mask"].sum(dim=1).tolist(),
                    "nonpad_tokens": batch["attention_mask"].sum(dim=1).tolist()}
            print("BENCH_BATCH " + json.dumps(info), flush=True)
        return batch

    trainer.data_collator = recording_collator
    trainer.train()


# ---- report ----------------------------------------------------------------------------------


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


QUIET = 0.10  # a run is "quiet" when other processes used < 10 % of the CPUs in its timed window


def summarize(results: list, sides: list) -> dict:
    summary = {}
    for side in sides:
        runs = [r for r in results if r.side == side and r.returncode == 0]
        if not runs:
            continue
        quiet = [r for r in runs if (r.extra.get("foreign_cpu_share") or 0.0) < QUIET]
        summary[side] = {
            "runs": len(runs),
            "pairs_per_s": median_or_none([r.pairs_per_s for r in runs]),
            "quiet_runs": len(quiet),
            "pairs_per_s_quiet": median_or_none([r.pairs_per_s for r in quiet]),
            "pairs_per_s_all": [r.pairs_per_s for r in runs],
            "peak_rss_mb": median_or_none([r.peak_rss_mb for r in runs]),
            "peak_pss_mb": median_or_none([r.peak_pss_mb for r in runs]),
            "wall_s": median_or_none([r.wall_s for r in runs]),
        }
        for key in ("internal_pairs_per_s", "tokens_per_s", "mfu", "tokens_per_step", "foreign_cpu_share",
                    "pairs_per_cpu_s"):
            vals = [r.extra.get(key) for r in runs]
            if any(v is not None for v in vals):
                summary[side][key] = median_or_none(vals)
    return summary


BASE_LABELS = {"trl": "TRL (grad. ckpt off)", "trl-gc": "TRL default (grad. ckpt on)"}


def markdown(summary: dict, reference: Optional[dict]) -> str:
    """Medians per side. Ratios use the medians over quiet runs (other processes used
    < 10 % of the CPUs during the timed window) when a side has any, else all runs."""

    def speed(s: dict) -> Optional[float]:
        return s.get("pairs_per_s_quiet") or s["pairs_per_s"]

    bases = [b for b in ("trl", "trl-gc") if b in summary and speed(summary[b])]
    head = ["side", "pairs/s, all runs", "pairs/s, quiet runs"]
    head += [f"speed x {BASE_LABELS[b]}" for b in bases]
    head += ["peak RSS MiB"] + [f"RSS x {BASE_LABELS[b]}" for b in bases]
    head += ["peak PSS MiB", "runs (quiet)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for side, s in summary.items():
        q = s.get("pairs_per_s_quiet")
        row = [side, f"{s['pairs_per_s']:.3f}" if s["pairs_per_s"] else "-", f"{q:.3f}" if q else "-"]
        row += [f"{speed(s) / speed(summary[b]):.2f}" if speed(s) else "-" for b in bases]
        row += [f"{s['peak_rss_mb']:.0f}"] + [f"{s['peak_rss_mb'] / summary[b]['peak_rss_mb']:.2f}" for b in bases]
        row += [f"{s['peak_pss_mb']:.0f}" if s.get("peak_pss_mb") else "-", f"{s['runs']} ({s.get('quiet_runs', 0)})"]
        lines.append("| " + " | ".join(row) + " |")
    if reference:
        lines.append("")
        lines.append(f"Reference precompute (one-off, {reference['pairs']} pairs, incl. start-up): "
                     f"{reference['wall_s']:.1f} s, {reference['pairs_per_s_incl_startup']:.3f} pairs/s, "
                     f"peak RSS {reference['peak_rss_mb']:.0f} MiB")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_trl_worker":
        trl_worker(json.loads(argv[1]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--size", choices=sorted(SIZES), default="bench")
    p.add_argument("--workdir", default="/tmp/megatron_mpo_bench")
    p.add_argument("--sides", default="ours,ours-unpacked,trl",
                   help="comma list of ours, ours-unpacked, ours-recompute, trl, trl-gc")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per run")
    p.add_argument("--warmup-steps", type=int, default=2, help="leading steps left out of pairs/s")
    p.add_argument("--global-batch", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--pairs", type=int, default=32, help="synthetic pairs in the dataset")
    p.add_argument("--trl-lm-head", choices=("compact", "as-shipped"), default="compact",
                   help="compact: TRL's LM head scores completion positions only, as TRL does on GPUs (default); "
                   "as-shipped: its CPU behaviour, every position")
    p.add_argument("--vocab", type=int, help="pad the model's vocabulary to this size (the tokenizer stays "
                   "tiny): weighs the output layer as a real 32k-151k vocabulary does")
    p.add_argument("--num-workers", type=int, default=0,
                   help="data.num_workers of our side (0: the 2-core CI box has no spare core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--skip-reference", action="store_true", help="reuse refs/ from an earlier run")
    p.add_argument("--out", help="results JSON (default WORKDIR/results.json)")
    p.add_argument("--table", metavar="RESULTS_JSON", help="only print the table of an earlier results file")
    args = p.parse_args(argv)
    if args.table:
        saved = json.loads(Path(args.table).read_text())
        runs = [RunResult(**r) for r in saved["runs"]]
        sides = list(dict.fromkeys(r.side for r in runs))
        print(markdown(summarize(runs, sides), saved.get("reference")))
        return
    if args.global_batch % args.micro_batch:
        p.error("--global-batch must be a multiple of --micro-batch")
    if not 0 < args.warmup_steps < args.steps:
        p.error("need 0 < --warmup-steps < --steps")
    sides = [s for s in args.sides.split(",") if s]
    bad = set(sides) - {"ours", "ours-unpacked", "ours-recompute", "trl", "trl-gc"}
    if bad:
        p.error(f"unknown sides {sorted(bad)}")
    if not trl_available():
        if any(s.startswith("trl") for s in sides):
            log("TRL / datasets / transformers not installed: skipping the TRL sides (pip install -e .[bench])")
        sides = [s for s in sides if not s.startswith("trl")]
        try:
            import transformers  # noqa: F401  (the workspace's HF model needs it)
        except ImportError:
            raise SystemExit("the benchmark needs transformers to build the shared HF model: pip install -e .[bench]")

    from megatron_mpo.config import DataSection

    ws = Path(args.workdir).absolute() / (args.size + (f"-vocab{args.vocab}" if args.vocab else ""))
    info = build_workspace(ws, args.size, args.pairs, args.seed, args.vocab)
    lengths = token_lengths(ws)
    log(f"model {info['params'] / 1e6:.1f}M params; per pair: {lengths['tiles']} tiles, prompt "
        f"{lengths['prompt']:.0f} tokens ({lengths['image_tokens']} image), chosen {lengths['chosen']:.0f}, "
        f"rejected {lengths['rejected']:.0f}; data.packing default = {DataSection().packing}")
    reference = None
    if not (args.skip_reference and (ws / "refs").exists()):
        log("reference precompute ...")
        reference = run_reference(ws, args)
        log(f"reference: {reference['wall_s']:.1f} s for {reference['pairs']} pairs, peak RSS "
            f"{reference['peak_rss_mb']:.0f} MiB")

    results = []
    for rep in range(args.reps):  # interleave sides so drifts of the machine hit all alike
        for side in sides:
            log(f"{side} rep {rep + 1}/{args.reps} ...")
            r = run_ours(ws, args, side, rep) if side.startswith("ours") else run_trl(ws, args, side, rep)
            results.append(r)
            status = "ok" if r.returncode == 0 else f"FAILED rc={r.returncode} (see {r.log})"
            pps = f"{r.pairs_per_s:.4f}" if r.pairs_per_s else "-"
            foreign = r.extra.get("foreign_cpu_share")
            busy = f", other processes used {100 * foreign:.0f}% of the CPUs" if foreign is not None else ""
            if r.extra.get("pairs_per_cpu_s"):
                busy += f", {r.extra['pairs_per_cpu_s']:.4f} pairs per CPU-second"
            log(f"  {status}: pairs/s {pps}, peak RSS {r.peak_rss_mb:.0f} MiB, wall {r.wall_s:.0f} s{busy}")
    summary = summarize(results, sides)
    table = markdown(summary, reference)
    out = Path(args.out) if args.out else ws / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "workspace": info, "lengths": lengths, "reference": reference,
                               "summary": summary, "runs": [asdict(r) for r in results]}, indent=1))
    print(table, flush=True)
    log(f"results: {out}")
    failed = [r for r in results if r.returncode != 0]
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: " + ", ".join(r.log for r in failed))


if __name__ == "__main__":
    main()
