#!/usr/bin/env python
"""MPO throughput and memory: this trainer vs TRL's DPOTrainer, same model, same pairs.

    python benchmarks/bench_mpo.py [--size bench] [--profile fixed|mmpr] [--reps 3] [--steps 6]
                                   [--warmup-steps 2] [--micro-batch 1] [--global-batch 2] [--dp 1]
                                   [--sides ours,ours-unpacked,trl] [--workdir DIR] [--out FILE]

One run does everything, in this order, each piece in its own subprocess:

1. workspace (once per ``--workdir`` and settings): a tiny tokenizer, a random
   ``transformers.InternVLForConditionalGeneration`` (``--size bench``: InternViT-style
   vision 192 wide x 4 layers at 448 px, Qwen2-style LLM 512 wide x 8 layers; ~27M
   parameters, fp32) saved with ``save_pretrained``, converted to a Megatron model
   directory with ``tools/convert_hf_to_megatron.py`` -- so both trainers start from the
   very same weights -- and synthetic MMPR pairs written as WebDataset shards (the
   project's ``make_shards``). ``--profile fixed``: one 896x448 image per pair (2 tiles +
   thumbnail = 3 tiles = 768 image tokens), chosen / rejected ~130 / ~100 tokens.
   ``--profile mmpr``: per pair an image whose grid of tiles, a question length and two
   response lengths are drawn from an MMPR-like distribution (``MMPR_*`` below, README
   "Realistic lengths"); the tile count comes from the real InternVL dynamic tiling of
   that image, capped by ``--max-tiles``. Plus a *floor* set: two minimal pairs (one
   tile, a few response tokens) for the memory floor;
2. the reference values (``megatron_mpo.reference.precompute``, what
   ``tools/precompute_ref_logps.py`` runs; timed and reported on its own: a one-off cost
   per dataset), for the pairs and the floor set;
3. with ``--floor`` (default), once per side: the memory floor, the peak RSS of the same
   side (same model, optimizer, checkpointing / recomputation) training
   ``FLOOR_STEPS`` steps of one minimal pair each -- imports, weights, gradients, Adam
   states (TRL: and its reference model) with next to no activations;
4. for each side, ``--reps`` runs of ``--steps`` optimizer steps of ``--global-batch``
   pairs (micro-batch ``--micro-batch``):

   * ``ours``: ``python -m megatron_mpo.train --config ...`` (single process, TP=1,
     packed rows -- the default -- with as many pairs per row as fit in
     ``data.max_length``; ``--dp N``: N data-parallel processes of one thread each under
     ``torch.distributed.run``, steps balanced over them), ``ours-one-per-row``: packed with ``data.pairs_per_row=1``,
     ``ours-unpacked``: ``data.packing=false``, ``ours-recompute``: packed with
     ``model.recompute=full`` (activation recomputation, the counterpart of TRL's
     gradient checkpointing), ``ours-unbalanced``: packed with ``data.balance=false`` (each
     data-parallel rank takes its next pairs as they come; the same as ``ours`` at one rank);
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
both sides). Tokens are the real tokens of the pairs in that window, counted alike on
both sides: prompt + chosen and prompt + rejected (TRL's two rows; ours shares the prompt
but is credited the same count). Padding share: LLM positions holding no token of a pair
/ all LLM positions, over the same micro-batches (ours: the micro-batches the trainer's
own loader builds, recorded in this process through the project's ``collate_pairs`` and
checked against the positions the trainer logs; TRL: its collator's padded rows vs
their attention masks). Peak memory is the peak, over the whole child run, of the summed
RSS of the child's process tree (trainer + data-loader workers), polled every 0.1 s;
the summed PSS (shared pages split between processes) is reported beside it. Activation
memory per pair = (peak RSS - the side's floor) / pairs per micro-batch. Medians over the
repetitions are printed as Markdown tables and written as JSON.

TRL, transformers and datasets are benchmark-only dependencies (``pip install -e .[bench]``);
without TRL the ``trl`` sides are skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

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
    # The bench model at half width and half depth (~3.6M parameters; same 448 px tiles and
    # 256 tokens per tile): realistic (--profile mmpr) lengths on a 2-core CPU within half an
    # hour, and TRL without checkpointing inside 24 GiB at 4 pairs per micro-batch.
    "lite": dict(
        vision=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                    image_size=448),
        text=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=704),
        image_wh=(896, 448),
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

# ---- length profiles -------------------------------------------------------------------------
#
# ``fixed``: every pair as SIZES[size] says (one image size, fixed response lengths).
# ``mmpr``: an MMPR-like spread. No length statistics of MMPR v1.1 are published (the paper,
# arXiv 2411.10442, and the dataset card give sources and sample counts), so this is an
# assumption chosen to match the ranges InternVL's MPO recipe implies: max_dynamic_patch 12
# (internvl_chat_mpo.py's default, kept by its MPO scripts) with a thumbnail, 256 tokens per
# 448 px tile, responses from tens of tokens (short answers) to ~1,000 (chain-of-thought).
# Blocks of the tile grid (thumbnail not counted) and their weights:
MMPR_BLOCKS = {1: 0.20, 2: 0.10, 3: 0.05, 4: 0.10, 6: 0.15, 8: 0.10, 9: 0.05, 12: 0.25}
# The grid (cols, rows) of a block count, one of these orientations at random:
MMPR_GRIDS = {1: [(1, 1)], 2: [(2, 1), (1, 2)], 3: [(3, 1), (1, 3)], 4: [(2, 2)], 6: [(3, 2), (2, 3)],
              8: [(4, 2), (2, 4)], 9: [(3, 3)], 12: [(4, 3), (3, 4)]}
# Image = grid x a square cell of this many tile sides (uniform): the aspect ratio is the
# grid's, and in this range InternVL's tie rule keeps that grid (not a multiple of it).
MMPR_CELL_SCALE = (0.75, 1.05)
MMPR_CHOSEN_TOKENS = (24, 1024)  # chosen response: log-uniform over this range
MMPR_REJECTED_SIGMA = 0.4  # rejected = chosen x exp(N(0, sigma)) ...
MMPR_REJECTED_MIN = 16  # ... clipped to [this, MMPR_CHOSEN_TOKENS[1]]
MMPR_QUESTION_TOKENS = (16, 96)  # question text after the image: uniform integer
PROFILES = {"fixed": dict(max_length=4096, max_tiles=6), "mmpr": dict(max_length=8192, max_tiles=12)}

FLOOR_PAIRS = 2  # minimal pairs of the floor set
FLOOR_STEPS = 2  # optimizer steps of a floor run (Adam's states exist from the first)


@dataclass(frozen=True)
class PairShape:
    """What the workspace draws for one synthetic pair: image size (and the tile grid it was
    drawn for; None for ``fixed``) and target text lengths (tokens of the tiny tokenizer;
    ``question_tokens`` 0: the fixed QUESTION)."""

    image_wh: Tuple[int, int]
    question_tokens: int
    chosen_tokens: int
    rejected_tokens: int
    grid: Optional[Tuple[int, int]] = None


def mmpr_shape(rng: random.Random, tile_px: int) -> PairShape:
    """One pair of the MMPR-like profile, from ``rng`` alone (so ``--seed`` fixes the set)."""
    blocks = rng.choices(list(MMPR_BLOCKS), weights=list(MMPR_BLOCKS.values()))[0]
    cols, rows = rng.choice(MMPR_GRIDS[blocks])
    cell = round(tile_px * rng.uniform(*MMPR_CELL_SCALE))
    low, high = MMPR_CHOSEN_TOKENS
    chosen = round(math.exp(rng.uniform(math.log(low), math.log(high))))
    rejected = round(chosen * math.exp(rng.gauss(0.0, MMPR_REJECTED_SIGMA)))
    rejected = min(max(rejected, MMPR_REJECTED_MIN), high)
    return PairShape((cols * cell, rows * cell), rng.randint(*MMPR_QUESTION_TOKENS), chosen, rejected, (cols, rows))


def draw_shapes(profile: str, size: str, num_pairs: int, seed: int) -> List[PairShape]:
    """The pairs' shapes: constant for ``fixed``, drawn per pair for ``mmpr``."""
    spec = SIZES[size]
    if profile == "fixed":
        return [PairShape(tuple(spec["image_wh"]), 0, spec["chosen_tokens"], spec["rejected_tokens"])] * num_pairs
    rng = random.Random(seed * 7919 + 17)  # apart from the text generator's stream
    return [mmpr_shape(rng, spec["vision"]["image_size"]) for _ in range(num_pairs)]


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


def write_raw(raw: Path, records: List[dict], name: str) -> None:
    """An MMPR-style meta.json + pairs.jsonl (images already in ``raw/images``)."""
    with open(raw / "pairs.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    meta = {name: {"root": "images", "annotation": "pairs.jsonl", "repeat_time": 1, "length": len(records)}}
    (raw / "meta.json").write_text(json.dumps(meta))


def shard(raw: Path, out: Path, per_shard: int) -> None:
    """The project's make_shards, in this process (one worker): no second torch start-up."""
    from megatron_mpo.data.shard_writer import MakeShardsConfig, make_shards

    make_shards(MakeShardsConfig(out=str(out), meta=str(raw / "meta.json"), samples_per_shard=per_shard, workers=1,
                                 progress=False))
    written = sum(s["samples"] for s in json.loads((out / "index.json").read_text())["shards"])
    expected = len((raw / "pairs.jsonl").read_text().splitlines())
    if written != expected:
        raise SystemExit(f"make_shards wrote {written} of {expected} pairs of {raw} (see {out}/refused.jsonl)")


def write_pairs(raw: Path, shapes: List[PairShape], tok, seed: int) -> None:
    """Synthetic MMPR pairs: a drawn shape per image, question and answers of the shapes' lengths."""
    rng = random.Random(seed)
    (raw / "images").mkdir(parents=True)
    from megatron_mpo.data.synthetic import draw_image

    records = []
    for i, shape in enumerate(shapes):
        w, h = shape.image_wh
        img, color, drawn = draw_image(w, h, seed * 1000 + i)
        name = f"img_{i:05d}.jpg"
        img.save(raw / "images" / name, quality=90)
        wrong = "circle" if drawn == "square" else "square"
        question = QUESTION
        if shape.question_tokens:
            question = "<image>\n" + _response_text(shape.question_tokens, tok, rng, "Look at the image.")
        chosen = _response_text(shape.chosen_tokens, tok, rng, f"The image shows a {color} {drawn}.")
        rejected = _response_text(shape.rejected_tokens, tok, rng, f"The image shows a {color} {wrong}.")
        records.append({"id": f"bench-{i}", "image": name, "question": question, "chosen": chosen,
                        "rejected": rejected})
    write_raw(raw, records, "bench")


def write_floor_pairs(raw: Path, tile_px: int, seed: int) -> None:
    """The floor set: FLOOR_PAIRS minimal pairs, one square one-tile image and one-sentence answers."""
    from megatron_mpo.data.synthetic import draw_image

    (raw / "images").mkdir(parents=True)
    records = []
    for i in range(FLOOR_PAIRS):
        img, color, drawn = draw_image(tile_px, tile_px, seed * 1000 + 900 + i)
        name = f"floor_{i}.jpg"
        img.save(raw / "images" / name, quality=90)
        wrong = "circle" if drawn == "square" else "square"
        records.append({"id": f"floor-{i}", "image": name, "question": "<image>\nWhat shape is this?",
                        "chosen": f"A {drawn}.", "rejected": f"A {wrong}."})
    write_raw(raw, records, "floor")


def build_workspace(ws: Path, size: str, num_pairs: int, seed: int, vocab: Optional[int] = None,
                    profile: str = "fixed") -> dict:
    """Tokenizer + HF model + converted Megatron dir + shards + the same pairs for TRL (+ floor set)."""
    settings = {"size": size, "pairs": num_pairs, "seed": seed, "version": 3, "profile": profile}
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
    from megatron_mpo.data.tiny_tokenizer import build_tiny_tokenizer

    hf = ws / "hf"
    build_tiny_tokenizer(str(hf))
    tok = load_tokenizer(str(hf))
    vision = dict(spec["vision"], patch_size=14, attention_bias=True, norm_type="layer_norm", use_qk_norm=False,
                  layer_scale_init_value=0.1)
    text = dict(spec["text"], model_type="qwen2", vocab_size=max(tok.vocab_size, vocab or 0),
                max_position_embeddings=16384, rope_theta=1e6, rms_norm_eps=1e-6, eos_token_id=tok.im_end_id,
                pad_token_id=tok.pad_id)
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

    shapes = draw_shapes(profile, size, num_pairs, seed)
    write_pairs(ws / "raw", shapes, tok, seed)
    shard(ws / "raw", ws / "shards", max(1, num_pairs // 2))
    write_floor_pairs(ws / "floor" / "raw", spec["vision"]["image_size"], seed)
    shard(ws / "floor" / "raw", ws / "floor" / "shards", FLOOR_PAIRS)

    info = {"settings": settings, "params": params, "vision_params": vision_params,
            "tokens_per_tile": tokens_per_tile, "image_wh": list(spec["image_wh"]) if profile == "fixed" else None,
            "shapes": [asdict(s) for s in shapes], "refs": None}
    marker.write_text(json.dumps(info, indent=1))
    return info


def _histogram(values: List[int]) -> Dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(values).items())}


def token_lengths(ws: Path, max_tiles: int = 6, max_length: int = 4096, raw: Optional[Path] = None) -> dict:
    """Per pair, as this trainer tokenizes and tiles it: tiles (real InternVL tiling of the
    image file, capped by ``max_tiles``), prompt / chosen / rejected tokens; their means, the
    tile histogram, the longest branch and packed pair, and how many pairs ``max_length``
    would cut (a branch is prompt + one response: what ``data.max_length`` bounds)."""
    from PIL import Image

    from megatron_mpo.data import load_tokenizer
    from megatron_mpo.data.samples import PairBuilder
    from megatron_mpo.data.templates import get_template
    from megatron_mpo.data.tiling import count_tiles
    from megatron_mpo.models.config import InternVLConfig
    from megatron_mpo.training.data_setup import default_template

    raw = raw or ws / "raw"
    mc = InternVLConfig.from_json((ws / "megatron" / "model_config.json").read_text())
    tok = load_tokenizer(str(ws / "megatron"))
    builder = PairBuilder(tok, get_template(default_template(mc)), max_length=100000, max_tiles=max_tiles,
                          image_size=mc.vision.image_size, tokens_per_tile=mc.tokens_per_tile)
    per: Dict[str, list] = {"tiles": [], "prompt": [], "chosen": [], "rejected": []}
    for line in (raw / "pairs.jsonl").read_text().splitlines():
        r = json.loads(line)
        with Image.open(raw / "images" / r["image"]) as img:
            tiles = count_tiles(img.width, img.height, mc.vision.image_size, max_tiles)
        per["tiles"].append(tiles)
        per["prompt"].append(len(builder.prompt_ids(r["question"], [tiles])))
        per["chosen"].append(len(builder.response_ids(r["chosen"])))
        per["rejected"].append(len(builder.response_ids(r["rejected"])))
    branches = [p + max(c, r) for p, c, r in zip(per["prompt"], per["chosen"], per["rejected"])]
    packed = [p + c + 1 + r for p, c, r in zip(per["prompt"], per["chosen"], per["rejected"])]
    out = {k: statistics.mean(v) for k, v in per.items()}
    out["image_tokens"] = out["tiles"] * mc.tokens_per_tile
    out.update(per_pair=per, tiles_hist=_histogram(per["tiles"]), longest_branch=max(branches),
               longest_packed=max(packed), mean_packed=statistics.mean(packed), max_length=max_length,
               cut_by_max_length=sum(b > max_length for b in branches))
    return out


# ---- our side --------------------------------------------------------------------------------

# Packing (data.packing), pairs per packed row (data.pairs_per_row: None = as many as fit in
# data.max_length) and model.recompute of each of our sides.
OURS_SIDES = {
    "ours": dict(packing=True, pairs_per_row=None, recompute=None),
    "ours-one-per-row": dict(packing=True, pairs_per_row=1, recompute=None),
    "ours-unpacked": dict(packing=False, pairs_per_row=None, recompute=None),
    "ours-recompute": dict(packing=True, pairs_per_row=None, recompute="full"),
    "ours-unbalanced": dict(packing=True, pairs_per_row=None, recompute=None, balance=False),
}
TRL_SIDES = {"trl": False, "trl-gc": True}  # gradient checkpointing
ALL_SIDES = tuple(OURS_SIDES) + tuple(TRL_SIDES)


def ours_config(ws: Path, args, side: str, metrics: Optional[Path], steps: int, floor: bool = False) -> dict:
    """The run config of one of our sides; ``floor``: one pair per step of the floor set."""
    s = OURS_SIDES[side]
    data = ws / "floor" if floor else ws
    global_batch, micro_batch = (1, 1) if floor else (args.global_batch, args.micro_batch)
    return {
        "model": {"init": str(ws / "megatron"), "recompute": s["recompute"]},
        "data": {
            "shards": str(data / "shards"),
            "ref_logps": str(data / "refs"),
            "max_length": args.max_length,
            "max_tiles": args.max_tiles,
            "num_workers": args.num_workers,
            "shuffle_buffer": 16,
            "packing": s["packing"],
            "pairs_per_row": s["pairs_per_row"],
            "balance": s.get("balance", True),
        },
        "train": {"global_batch": global_batch, "micro_batch": micro_batch, "steps": steps,
                  "lr": 1.0e-6, "min_lr": 0.0, "warmup": 0, "schedule": "constant", "weight_decay": 0.05,
                  "clip_grad": 1.0, "device": "cpu", "seed": args.seed},
        "mpo": {"beta": BETA, "weights": {"preference": MPO_LOSS_WEIGHTS[0], "quality": MPO_LOSS_WEIGHTS[1],
                                           "generation": MPO_LOSS_WEIGHTS[2]}},
        "logging": {"metrics": str(metrics) if metrics else None, "interval": 1,
                    "sample_log": str(sample_log_dir(metrics)) if metrics else None},
    }


def sample_log_dir(metrics: Path) -> Path:
    """Where a run of ours writes which pairs each rank trained per step (logging.sample_log)."""
    return metrics.with_name(metrics.stem + "_samples")


def compute_log_dir(metrics: Path) -> Path:
    """Where a --dp run of ours writes each rank's compute time per step (``_train_worker``)."""
    return metrics.with_name(metrics.stem + "_compute")


def train_worker(config: str, out: str) -> None:
    """Runs inside each rank of a --dp run: the trainer, with the CPU seconds of the main
    thread (one thread per rank: all of its compute) and the wall seconds of every training
    schedule call written to ``out/rank{N}.jsonl``. CPU time is what the rank computed; waiting
    for the other rank (a blocking gloo receive) and other processes' load do not count."""
    import torch

    from megatron_mpo.train import main as train_main
    from megatron_mpo.training import schedule

    run, steps = schedule.run_schedule, []

    def timed(*a, **kw):
        cpu, wall = time.thread_time(), time.perf_counter()
        result = run(*a, **kw)
        if not kw.get("forward_only"):
            steps.append({"step": len(steps) + 1, "cpu_s": time.thread_time() - cpu,
                          "wall_s": time.perf_counter() - wall})
            Path(out).mkdir(parents=True, exist_ok=True)
            with open(Path(out) / f"rank{torch.distributed.get_rank()}.jsonl", "a") as f:
                f.write(json.dumps(steps[-1]) + "\n")
        return result

    schedule.run_schedule = timed
    train_main(["--config", config])


def write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


REF_DONE = "BENCH_REF_DONE"


def run_reference(ws: Path, args, with_floor: bool) -> dict:
    """Reference values of all pairs (sidecars into ws/refs), then of the floor set, in one
    child; the reported time ends when the pairs' values are written (start-up included)."""
    cfgs = [write_yaml(ws / "configs" / "ref.yaml", ours_config(ws, args, "ours", None, 1))]
    if with_floor:
        cfgs.append(write_yaml(ws / "configs" / "ref_floor.yaml", ours_config(ws, args, "ours", None, 1, floor=True)))
    for d in (ws / "refs", ws / "floor" / "refs"):
        if d.exists():
            shutil.rmtree(d)
    rc, wall, stamps, rss, pss, text, _ = run_child([sys.executable, str(THIS), "_reference_worker", *map(str, cfgs)],
                                                    ws / "logs" / "reference.log", REF_DONE, args.timeout)
    if rc != 0 or not stamps:
        raise SystemExit(f"reference precompute failed (rc {rc}):\n{text[-4000:]}")
    pairs = json.loads((ws / "workspace.json").read_text())["settings"]["pairs"]
    return {"wall_s": stamps[0], "pairs": pairs, "pairs_per_s_incl_startup": pairs / stamps[0], "peak_rss_mb": rss,
            "peak_pss_mb": pss, "child_wall_s": wall}


def reference_worker(config_paths: List[str]) -> None:
    """Runs inside the child: what tools/precompute_ref_logps.py does, once per config."""
    from megatron_mpo.config import load_config
    from megatron_mpo.console import setup_console
    from megatron_mpo.reference import precompute

    setup_console()
    for path in config_paths:
        precompute(load_config(path, []))
        print(REF_DONE, flush=True)


# Per micro-batch, on both sides: pairs, LLM rows x positions, positions holding a token of a
# pair ("real"; the rest is padding), the pairs' tokens counted as TRL's rows hold them
# (prompt + chosen + prompt + rejected), image tiles.
BATCH_KEYS = ("pairs", "positions", "real_positions", "pair_tokens", "tiles")


def pair_record(pairs, batch, layout: str) -> dict:
    """A micro-batch of ours in BATCH_KEYS terms, from the TokenizedPairs and the collated batch."""
    from megatron_mpo.data.collate import packed_length

    tokens = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    rows, seq = batch.input_ids.shape
    return {"pairs": len(pairs), "rows": int(rows), "seq": int(seq), "positions": int(rows * seq),
            "real_positions": sum(packed_length(p) for p in pairs) if layout == "packed" else tokens,
            "pair_tokens": tokens, "tiles": sum(p.num_tiles for p in pairs),
            "truncated": sum("response_truncated" in p.flags for p in pairs)}


def ours_micro_batches(ws: Path, args, side: str) -> List[dict]:
    """The first steps x (global / micro) micro-batches our trainer's loader builds for
    ``side``: the trainer's own data pipeline, built from the side's config in this process,
    with the project's ``collate_pairs`` wrapped to record each micro-batch's pairs. The
    loader order is a pure function of the config (seed, workers), so these are the
    trainer's micro-batches; run_ours checks their positions against the trainer's log."""
    import megatron_mpo.data.pipeline as pipeline
    from megatron_mpo.config import load_config
    from megatron_mpo.data import build_loader
    from megatron_mpo.models.config import InternVLConfig
    from megatron_mpo.training import data_setup

    cfg = load_config(str(write_yaml(ws / "configs" / f"{side}_data.yaml",
                                     ours_config(ws, args, side, None, args.steps))), [])
    mc = InternVLConfig.from_json((ws / "megatron" / "model_config.json").read_text())
    data, loading = data_setup.loader_data(cfg, mc), data_setup.loader_plan(cfg, mc)
    records: List[dict] = []
    collate = pipeline.collate_pairs

    def recording(pairs, *rest, **kwargs):
        batch = collate(pairs, *rest, **kwargs)
        records.append(pair_record(pairs, batch, loading.layout))
        return batch

    pipeline.collate_pairs = recording
    batches = iter(build_loader(data, loading, data_setup.tokenizer(cfg)))
    try:
        for _ in range(args.steps * (args.global_batch // args.micro_batch)):
            next(batches)
    finally:
        pipeline.collate_pairs = collate
        close = getattr(batches, "close", None)
        if close:
            close()
    return records


def step_sums(batches: List[dict], accum: int, key: str) -> List[int]:
    """Per optimizer step (``accum`` micro-batches each, in order): the sum of ``key``."""
    return [sum(b[key] for b in batches[i:i + accum]) for i in range(0, len(batches) - accum + 1, accum)]


def window_stats(batches: List[dict], stamps: list, warmup: int, steps: int, accum: int) -> dict:
    """Tokens/s, padding share and LLM positions per pair over the timed window (the
    micro-batches of steps warmup+1 .. steps, the window pairs/s is measured over)."""
    window = batches[warmup * accum: steps * accum]
    if len(window) < (steps - warmup) * accum or len(stamps) < steps or warmup < 1:
        return {}
    sums = {k: sum(b[k] for b in window) for k in BATCH_KEYS}
    elapsed = stamps[steps - 1] - stamps[warmup - 1]
    return {"pair_tokens_per_s": sums["pair_tokens"] / elapsed if elapsed > 0 else None,
            "padding_share": 1.0 - sums["real_positions"] / sums["positions"],
            "positions_per_pair": sums["positions"] / sums["pairs"],
            "window": sums}


def window_is_whole_epochs(args) -> bool:
    """True when the warm-up steps and the timed steps each hold whole passes over the pairs:
    then every side times exactly the same pairs (each once per pass), whatever order its
    loader draws them in. Otherwise sides may time different pairs -- with lengths drawn
    per pair (--profile mmpr) that alone moves pairs/s."""
    return (args.warmup_steps * args.global_batch) % args.pairs == 0 and \
        ((args.steps - args.warmup_steps) * args.global_batch) % args.pairs == 0


def _load_extra(stamps: list, load: list, args) -> dict:
    return {"foreign_cpu_share": foreign_cpu_share(stamps, load, args.warmup_steps, args.steps),
            "pairs_per_cpu_s": pairs_per_cpu_s(load, args.warmup_steps, args.steps, args.global_batch),
            "load": load}


def logged_positions(row: dict, global_batch: int) -> int:
    """LLM positions of one step as the trainer logs them (tokens_per_s counts every position)."""
    return round(row["tokens_per_s"] * global_batch / row["samples_per_s"])


def run_ours(ws: Path, args, side: str, rep: int, batches: Optional[List[dict]] = None) -> RunResult:
    metrics = ws / "runs" / f"{side}_{rep}.jsonl"
    if metrics.exists():
        metrics.unlink()
    cfg = write_yaml(ws / "configs" / f"{side}.yaml", ours_config(ws, args, side, metrics, args.steps))
    if sample_log_dir(metrics).exists():
        shutil.rmtree(sample_log_dir(metrics))
    cmd = [sys.executable, "-m", "megatron_mpo.train", "--config", str(cfg)]
    if args.dp > 1:  # one thread per rank (torch.distributed.run's default), compute CPU time recorded
        if compute_log_dir(metrics).exists():
            shutil.rmtree(compute_log_dir(metrics))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.dp}",
               str(THIS), "_train_worker", str(cfg), str(compute_log_dir(metrics))]
    rc, wall, stamps, rss, pss, text, load = run_child(cmd, ws / "logs" / f"{side}_{rep}.log", "step ", args.timeout)
    extra = _load_extra(stamps, load, args)
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.is_file() else []
    steady = [r for r in rows if r["step"] > args.warmup_steps]
    if steady:
        extra["internal_pairs_per_s"] = statistics.median(r["samples_per_s"] for r in steady)
        extra["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in steady)
        extra["mfu"] = statistics.median(r["mfu"] for r in steady)
        extra["loss_last"] = rows[-1]["loss"]
        extra["tokens_per_step"] = statistics.median(r["tokens_per_s"] / r["samples_per_s"] * args.global_batch
                                                     for r in steady)
    if rows:
        extra["responses_truncated"] = rows[-1].get("responses_truncated_total")
    if batches:
        accum = args.global_batch // args.micro_batch
        extra.update(window_stats(batches, stamps, args.warmup_steps, args.steps, accum))
        extra["positions_logged"] = [logged_positions(r, args.global_batch) for r in rows]
        extra["positions_harness"] = step_sums(batches, accum, "positions")[:len(rows)]
        extra["positions_match"] = bool(rows) and extra["positions_logged"] == extra["positions_harness"]
    return RunResult(side, rep, rc, wall, stamps,
                     steady_pairs_per_s(stamps, args.steps, args.warmup_steps, args.global_batch),
                     rss, pss, str(ws / "logs" / f"{side}_{rep}.log"), extra)


def run_floor(ws: Path, args, side: str) -> dict:
    """The side's memory floor: peak RSS of the same side training FLOOR_STEPS steps of one
    minimal pair each (the floor set)."""
    if side in OURS_SIDES:
        cfg = write_yaml(ws / "configs" / f"{side}_floor.yaml", ours_config(ws, args, side, None, FLOOR_STEPS, True))
        cmd, prefix = [sys.executable, "-m", "megatron_mpo.train", "--config", str(cfg)], "step "
    else:
        cmd, prefix = [sys.executable, str(THIS), "_trl_worker", json.dumps(trl_spec(ws, args, side, "floor", True))], \
            "BENCH_STEP "
    path = ws / "logs" / f"{side}_floor.log"
    rc, wall, stamps, rss, pss, _, _ = run_child(cmd, path, prefix, args.timeout)
    ok = rc == 0 and len(stamps) == FLOOR_STEPS
    return {"ok": ok, "returncode": rc, "steps": len(stamps), "peak_rss_mb": rss, "peak_pss_mb": pss,
            "wall_s": wall, "log": str(path)}


# ---- TRL side --------------------------------------------------------------------------------


def trl_spec(ws: Path, args, side: str, tag: str, floor: bool = False) -> dict:
    """What the TRL child runs: the pairs (or the floor set, one pair per step) and settings."""
    global_batch, micro_batch = (1, 1) if floor else (args.global_batch, args.micro_batch)
    return {
        "ws": str(ws), "raw": str(ws / "floor" / "raw" if floor else ws / "raw"),
        "steps": FLOOR_STEPS if floor else args.steps, "global_batch": global_batch, "micro_batch": micro_batch,
        "seed": args.seed, "gradient_checkpointing": TRL_SIDES[side], "out": str(ws / "runs" / f"{side}_{tag}"),
        "lm_head": args.trl_lm_head, "max_tiles": args.max_tiles,
    }


def trl_record(info: dict) -> dict:
    """A TRL micro-batch (its collator's BENCH_BATCH line) in BATCH_KEYS terms: every
    non-padding position is a token of the pair's prompt + chosen or prompt + rejected row."""
    real = sum(info["nonpad_tokens"])
    return {"pairs": info["rows"] // 2, "rows": info["rows"], "seq": info["seq"],
            "positions": info["rows"] * info["seq"], "real_positions": real, "pair_tokens": real,
            "tiles": info["tiles"]}


def run_trl(ws: Path, args, side: str, rep: int) -> RunResult:
    cmd = [sys.executable, str(THIS), "_trl_worker", json.dumps(trl_spec(ws, args, side, str(rep)))]
    rc, wall, stamps, rss, pss, text, load = run_child(cmd, ws / "logs" / f"{side}_{rep}.log", "BENCH_STEP ",
                                                       args.timeout)
    extra = _load_extra(stamps, load, args)
    infos = [json.loads(line[len("BENCH_BATCH "):]) for line in text.splitlines() if line.startswith("BENCH_BATCH ")]
    if infos:
        extra["first_batch"] = infos[0]
        batches = [trl_record(i) for i in infos]
        extra["batches"] = batches
        extra.update(window_stats(batches, stamps, args.warmup_steps, args.steps,
                                  args.global_batch // args.micro_batch))
    for line in text.splitlines():
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
        crop_to_patches=True, min_patches=1, max_patches=spec.get("max_tiles", 6),
        size={"height": mc.vision.image_size, "width": mc.vision.image_size})
    processor = Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=mc.tokens_per_tile)

    raw = Path(spec.get("raw", ws / "raw"))
    rows = [json.loads(x) for x in (raw / "pairs.jsonl").read_text().splitlines() if x.strip()]
    data = {
        "images": [[str(raw / "images" / r["image"])] for r in rows],
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

    def recording_collator(examples):
        # Every micro-batch, in the order the trainer draws them: rows x padded length vs
        # the attention mask's real tokens (the parent's padding share and tokens/s).
        batch = collate(examples)
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


def summarize(results: list, sides: list, floors: Optional[dict] = None, micro_batch: int = 1) -> dict:
    """Medians per side; with ``floors``, the floor and the activation memory per pair
    ((median peak RSS - floor) / pairs per micro-batch)."""
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
                    "pairs_per_cpu_s", "pair_tokens_per_s", "padding_share", "positions_per_pair"):
            vals = [r.extra.get(key) for r in runs]
            if any(v is not None for v in vals):
                summary[side][key] = median_or_none(vals)
        floor = (floors or {}).get(side)
        if floor and floor.get("ok"):
            summary[side]["floor_rss_mb"] = floor["peak_rss_mb"]
            summary[side]["pairs_per_micro_batch"] = micro_batch
            above_floor = summary[side]["peak_rss_mb"] - floor["peak_rss_mb"]
            summary[side]["activation_mb_per_pair"] = above_floor / micro_batch
    return summary


BASE_LABELS = {"trl": "TRL (grad. ckpt off)", "trl-gc": "TRL default (grad. ckpt on)"}


def speed(s: dict) -> Optional[float]:
    """A side's pairs/s for ratios: the median over quiet runs when it has any, else all runs."""
    return s.get("pairs_per_s_quiet") or s["pairs_per_s"]


def _ratio(value: Optional[float], base: Optional[float]) -> str:
    return f"{value / base:.2f}" if value is not None and base else "-"


def _num(value: Optional[float], fmt: str) -> str:
    return format(value, fmt) if value is not None else "-"


def markdown(summary: dict, reference: Optional[dict]) -> str:
    """Medians per side. Ratios use the medians over quiet runs (other processes used
    < 10 % of the CPUs during the timed window) when a side has any, else all runs."""
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
    if any("pair_tokens_per_s" in s or "activation_mb_per_pair" in s for s in summary.values()):
        lines += ["", tokens_and_memory_table(summary, bases)]
        lines += [""] + target_lines(summary)
    if reference:
        lines.append("")
        lines.append(f"Reference precompute (one-off, {reference['pairs']} pairs, incl. start-up): "
                     f"{reference['wall_s']:.1f} s, {reference['pairs_per_s_incl_startup']:.3f} pairs/s, "
                     f"peak RSS {reference['peak_rss_mb']:.0f} MiB")
    return "\n".join(lines)


def tokens_and_memory_table(summary: dict, bases: List[str]) -> str:
    """Tokens/s, what the LLM computes per pair, padding, and peak RSS split into the
    side's measured floor and activation memory per pair (with ratios to TRL). Pairs per
    CPU-second (of the child's process tree) is the figure least moved by other load."""
    head = ["side", "pairs/s", "pairs per CPU-s", "tokens/s", "LLM positions per pair", "padding share", "peak RSS MiB",
            "floor MiB",
            "activation MiB per pair"] + [f"activation x {BASE_LABELS[b]}" for b in bases]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for side, s in summary.items():
        act = s.get("activation_mb_per_pair")
        padding = s.get("padding_share")
        row = [side, _num(speed(s), ".3f"), _num(s.get("pairs_per_cpu_s"), ".3f"),
               _num(s.get("pair_tokens_per_s"), ".0f"),
               _num(s.get("positions_per_pair"), ".0f"), f"{100 * padding:.1f} %" if padding is not None else "-",
               f"{s['peak_rss_mb']:.0f}", _num(s.get("floor_rss_mb"), ".0f"), _num(act, ".0f")]
        row += [_ratio(act, summary[b].get("activation_mb_per_pair")) for b in bases]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


SPEED_TARGET = 3.0  # >= 3x TRL default's pairs/s ...
ACTIVATION_TARGET = 0.5  # ... at <= 0.5x its activation memory per pair, from one invocation


def target_lines(summary: dict, base: str = "trl-gc") -> List[str]:
    """Each of our sides against the targets (vs TRL default), with the margin either way
    and the counts that explain it (LLM positions per pair, padding share)."""
    b = summary.get(base)
    if not b or not speed(b):
        return [f"Targets: no {base} run to compare with."]
    lines = [f"Targets against {BASE_LABELS[base]}: pairs/s >= {SPEED_TARGET:g}x, activation memory per pair "
             f"<= {ACTIVATION_TARGET:g}x."]
    for side, s in summary.items():
        if side not in OURS_SIDES or not speed(s):
            continue
        r = speed(s) / speed(b)
        verdict = "met" if r >= SPEED_TARGET else f"missed: {SPEED_TARGET - r:.2f}x short, {r / SPEED_TARGET:.0%} of it"
        text = f"* {side}: {r:.2f}x the pairs/s ({verdict})"
        act, base_act = s.get("activation_mb_per_pair"), b.get("activation_mb_per_pair")
        if act is not None and base_act:
            a = act / base_act
            verdict = "met" if a <= ACTIVATION_TARGET else f"missed: {a / ACTIVATION_TARGET:.2f}x the allowed memory"
            text += f", {a:.2f}x the activation memory per pair ({verdict})"
        if s.get("positions_per_pair") and b.get("positions_per_pair"):
            text += (f"; LLM positions per pair {s['positions_per_pair']:.0f} vs {b['positions_per_pair']:.0f} "
                     f"(padding {100 * s['padding_share']:.1f} % vs {100 * b['padding_share']:.1f} %; TRL also "
                     "runs its reference model forward over its rows)")
        lines.append(text + ".")
    return lines


def describe_lengths(lengths: dict) -> str:
    """One log line about the pairs as this trainer tokenizes them."""
    return (f"per pair (means): {lengths['tiles']:.2f} tiles (histogram {lengths['tiles_hist']}), prompt "
            f"{lengths['prompt']:.0f} tokens ({lengths['image_tokens']:.0f} image), chosen {lengths['chosen']:.0f}, "
            f"rejected {lengths['rejected']:.0f}; packed pair {lengths['mean_packed']:.0f} (longest "
            f"{lengths['longest_packed']}), longest branch {lengths['longest_branch']} of max_length "
            f"{lengths['max_length']} ({lengths['cut_by_max_length']} pairs cut)")


def parse_args(argv: list) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--size", choices=sorted(SIZES), default="bench")
    p.add_argument("--profile", choices=sorted(PROFILES), default="fixed",
                   help="pair lengths: fixed (one image size, fixed answers) or mmpr (tiles, question and answer "
                   "lengths drawn per pair, see README 'Realistic lengths')")
    p.add_argument("--max-length", type=int, help="data.max_length of our side (default: 4096 fixed, 8192 mmpr)")
    p.add_argument("--max-tiles", type=int, help="data.max_tiles of our side and TRL's max patches "
                   "(default: 6 fixed, 12 mmpr)")
    p.add_argument("--workdir", default="/tmp/megatron_mpo_bench")
    p.add_argument("--sides", default="ours,ours-unpacked,trl", help="comma list of " + ", ".join(ALL_SIDES))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per run")
    p.add_argument("--warmup-steps", type=int, default=2, help="leading steps left out of pairs/s")
    p.add_argument("--global-batch", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--dp", type=int, default=1, help="data-parallel processes of our sides (torch.distributed.run, "
                   "one thread each; no TRL sides, no floors)")
    p.add_argument("--pairs", type=int, default=32, help="synthetic pairs in the dataset")
    p.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                   help="measure each side's memory floor (one run per side on the minimal floor set)")
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
    for key, value in PROFILES[args.profile].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.table:
        if args.global_batch % (args.micro_batch * args.dp):
            p.error("--global-batch must be a multiple of --micro-batch x --dp")
        if args.dp > 1 and any(s in TRL_SIDES for s in args.sides.split(",")):
            p.error("--dp > 1 runs our sides only")
        if args.dp > 1:
            args.floor = False  # a floor run's one-pair steps do not split over ranks
        if not 0 < args.warmup_steps < args.steps:
            p.error("need 0 < --warmup-steps < --steps")
        bad = set(s for s in args.sides.split(",") if s) - set(ALL_SIDES)
        if bad:
            p.error(f"unknown sides {sorted(bad)}")
    return args


def print_saved_table(path: str) -> None:
    """The tables of an earlier results file."""
    saved = json.loads(Path(path).read_text())
    runs = [RunResult(**r) for r in saved["runs"]]
    sides = list(dict.fromkeys(r.side for r in runs))
    micro = saved.get("args", {}).get("micro_batch", 1)
    print(markdown(summarize(runs, sides, saved.get("floors"), micro), saved.get("reference")))


def usable_sides(requested: List[str]) -> List[str]:
    """The requested sides this environment can run (TRL sides need TRL + datasets)."""
    if trl_available():
        return requested
    if any(s in TRL_SIDES for s in requested):
        log("TRL / datasets / transformers not installed: skipping the TRL sides (pip install -e .[bench])")
    import importlib.util

    if importlib.util.find_spec("transformers") is None:  # the workspace's HF model needs it
        raise SystemExit("the benchmark needs transformers to build the shared HF model: pip install -e .[bench]")
    return [s for s in requested if s not in TRL_SIDES]


def log_run(r: RunResult) -> None:
    status = "ok" if r.returncode == 0 else f"FAILED rc={r.returncode} (see {r.log})"
    pps = f"{r.pairs_per_s:.4f}" if r.pairs_per_s else "-"
    foreign = r.extra.get("foreign_cpu_share")
    busy = f", other processes used {100 * foreign:.0f}% of the CPUs" if foreign is not None else ""
    if r.extra.get("pairs_per_cpu_s"):
        busy += f", {r.extra['pairs_per_cpu_s']:.4f} pairs per CPU-second"
    if r.extra.get("padding_share") is not None:
        busy += f", padding {100 * r.extra['padding_share']:.1f} %"
    if r.extra.get("positions_match") is False:
        busy += " -- WARNING: the trainer logged other positions than the harness's micro-batches"
    log(f"  {status}: pairs/s {pps}, peak RSS {r.peak_rss_mb:.0f} MiB, wall {r.wall_s:.0f} s{busy}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_trl_worker":
        trl_worker(json.loads(argv[1]))
        return
    if argv and argv[0] == "_reference_worker":
        reference_worker(argv[1:])
        return
    if argv and argv[0] == "_train_worker":
        train_worker(*argv[1:3])
        return
    args = parse_args(argv)
    if args.table:
        print_saved_table(args.table)
        return
    sides = usable_sides([s for s in args.sides.split(",") if s])

    from megatron_mpo.data import DataConfig

    name = args.size + (f"-vocab{args.vocab}" if args.vocab else "")
    name += "" if args.profile == "fixed" else f"-{args.profile}"
    ws = Path(args.workdir).absolute() / name
    info = build_workspace(ws, args.size, args.pairs, args.seed, args.vocab, args.profile)
    lengths = token_lengths(ws, args.max_tiles, args.max_length)
    log(f"model {info['params'] / 1e6:.1f}M params; {describe_lengths(lengths)}; data.packing default = "
        f"{DataConfig().packing}, data.pairs_per_row default = {DataConfig().pairs_per_row}")
    if not window_is_whole_epochs(args):
        log(f"note: warm-up ({args.warmup_steps} steps) and timed window ({args.steps - args.warmup_steps} steps) of "
            f"{args.global_batch} pairs are not whole passes over the {args.pairs} pairs: the sides may time "
            "different pairs (choose --pairs = global batch x timed steps = global batch x warm-up steps)")
    ours = [s for s in sides if s in OURS_SIDES]
    reference = None
    if not (args.skip_reference and (ws / "refs").exists() and (not args.floor or (ws / "floor" / "refs").exists())):
        log("reference precompute ...")
        reference = run_reference(ws, args, with_floor=args.floor and bool(ours))
        log(f"reference: {reference['wall_s']:.1f} s for {reference['pairs']} pairs, peak RSS "
            f"{reference['peak_rss_mb']:.0f} MiB")

    micro_batches = {}
    for side in ours:
        if args.dp > 1:
            log("--dp > 1: the harness rebuilds one rank's loader only; no padding share or positions check")
            break
        micro_batches[side] = ours_micro_batches(ws, args, side)
        if args.num_workers:
            log("--num-workers > 0: the harness cannot see the loader workers' micro-batches; no padding share")
            micro_batches[side] = []
    floors = {}
    if args.floor:
        for side in sides:
            log(f"{side} floor ...")
            floors[side] = run_floor(ws, args, side)
            f = floors[side]
            log(f"  {'ok' if f['ok'] else 'FAILED, see ' + f['log']}: floor peak RSS {f['peak_rss_mb']:.0f} MiB")

    results = []
    for rep in range(args.reps):  # interleave sides so drifts of the machine hit all alike
        for side in sides:
            log(f"{side} rep {rep + 1}/{args.reps} ...")
            if side in OURS_SIDES:
                r = run_ours(ws, args, side, rep, micro_batches.get(side))
            else:
                r = run_trl(ws, args, side, rep)
            results.append(r)
            log_run(r)
    summary = summarize(results, sides, floors, args.micro_batch)
    table = markdown(summary, reference)
    out = Path(args.out) if args.out else ws / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "same_pairs_timed": window_is_whole_epochs(args),
                               "workspace": info, "lengths": lengths, "reference": reference, "floors": floors,
                               "micro_batches": micro_batches, "summary": summary,
                               "runs": [asdict(r) for r in results]}, indent=1))
    print(table, flush=True)
    log(f"results: {out}")
    failed = [r for r in results if r.returncode != 0] + [f for f in floors.values() if not f["ok"]]
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: " + ", ".join(r.log if isinstance(r, RunResult) else r["log"]
                                                                      for r in failed))


if __name__ == "__main__":
    main()
