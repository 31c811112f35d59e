#!/usr/bin/env python
"""Training step time, tokens/s, MFU and peak memory per attention, layout and row length.

    python benchmarks/gpu_bench.py [--size 2b|smoke] [--device auto|cuda|cpu]
                                   [--attentions flex,sdpa,te] [--layouts packed,unpacked]
                                   [--row-lengths 4096,8192,12288] [--steps 3] [--warmup 1]
                                   [--rows N] [--micro-batch N] [--budget-s S] [--out FILE]

One invocation compares, on the same preference pairs, the LLM core attentions of the
trainer (``model.attention``) over the two row layouts (``data.packing``):

* ``flex/packed``: the local spec with FlexAttention; packed rows of several pairs (as many
  as fit in the row length, ``data.pairs_per_row: null``), one block mask per micro-batch.
* ``sdpa/packed``: the local spec with torch SDPA run pair by pair (the non-TE baseline).
* ``te/packed``: the Transformer Engine spec with TE's own core attention, which takes the
  packed rows as a dense mask (its unfused path: [rows, heads, S, S] per layer; may run
  out of memory at long rows, which is reported as such, not as a failure).
* ``flex/unpacked``, ``sdpa/unpacked`` and ``te/unpacked``: plain causal rows (prompt + one
  response each; FlexAttention's causal block mask -- the rows carry no mask, and the local
  spec builds none for FlexAttention -- FlashAttention through SDPA's causal mode, or TE's
  fused kernel), the same pairs split into micro-batches of ``--micro-batch`` pairs, padded
  to FlexAttention's block size under ``flex`` as the trainer pads them.

For each row length ``S`` the pairs are drawn once (same seed for every attention) and
packed first-fit into ``--rows`` rows of exactly ``S`` positions (padded at the end); an
optimizer step is those rows as micro-batches (packed), or the same pairs as unpacked
micro-batches. FlexAttention is skipped on a CPU, with a note: torch has no FlexAttention
backward there (the model would silently take the SDPA path). ``te`` is skipped, with a
note, without Transformer Engine or a GPU. Every attention and layout runs the first row
length before any runs a second, so a spent ``--budget-s`` still leaves each of them one
measurement (a model is then built once more per attention for the later lengths).

``--size 2b`` (the default) is a randomly initialised InternVL2-2B (InternViT-300M +
InternLM2-1.8B; no checkpoint, nothing to download) in bf16 with fp32 master weights at
TP=1, with pairs of 3-6 image tiles of 448 px (256 tokens each), a text prompt and two
responses: 1.1k-2.2k positions per pair, so a 4k row holds 2-3 pairs and a 12k row 6-9.
``--size smoke`` is the tiny preset in fp32 (pairs of 45-130 positions, rows of 256 and
512): seconds on a CPU, for the CPU test ``tests/test_gpu_kit.py``.

The step is the trainer's step: ``build_model_chunks`` -> ``wrap_data_parallel``
(megatron-core DDP) -> ``build_optimizer`` (distributed optimizer) -> ``make_forward_step``
with ``MPOLoss`` -> ``run_schedule`` with megatron-core's ``forward_backward_func`` ->
``optimizer.step()``, on micro-batches collated by the data pipeline's collator
(``collate_pairs``) from synthetic token ids, random pixel tiles and random reference
log-probs; collation is done before timing, the host to device copy is inside the step.
One model (and optimizer) is built per attention and mask type and serves every row
length (the local spec's ``sdpa`` model serves both layouts: its attention reads the mask
it is given either way); warm-up steps (FlexAttention compiles then, once per row length)
are excluded and the table reports medians over the measured steps. ``tokens/s`` counts
positions computed (padding included, as the trainer logs), ``pair tokens/s`` prompt +
chosen + rejected (the same work in every layout). MFU is model FLOPs (``FlopCounter``
with the query-key pairs each layout really attends, ``PairBatch.attended_keys``) over the
device's nominal dense bf16 peak (``nominal_peak``; an unknown GPU or a CPU gets a measured
matmul peak). Peak memory is ``torch.cuda.max_memory_allocated`` over the measured steps of
that configuration (weights, fp32 master weights, Adam moments, gradients, activations);
on a CPU it is the process's peak RSS, which is not comparable. ``--out`` is rewritten
after every configuration, so a run cut short still leaves what it measured;
``--budget-s`` starts no new configuration once that many seconds have passed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform as host_platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from megatron_mpo.console import exit_on_user_error  # noqa: E402
from megatron_mpo.errors import UserError  # noqa: E402

ATTENTIONS = ("flex", "sdpa", "te")
LAYOUTS = ("packed", "unpacked")
PAD_ID = 0


@dataclass(frozen=True)
class Size:
    """A model preset and the shape of its synthetic pairs."""

    preset: str
    dtype: str
    tiles: tuple[int, int]  # image tiles per pair, inclusive range
    prompt_text: tuple[int, int]  # text tokens of the prompt besides the image tokens
    response: tuple[int, int]  # tokens of each response (chosen and rejected drawn apart)
    row_lengths: tuple[int, ...]  # packed row lengths S compared by default
    micro_batch: int  # pairs per unpacked micro-batch
    rows: int  # packed rows (micro-batches) per optimizer step


SIZES = {
    # 3-6 tiles x 256 = 768-1536 image tokens + 32-96 prompt text + 2 x 150-300 response
    # tokens: 1.1k-2.2k positions per pair. One row of S per step; 12k packed rows and
    # 2-pair unpacked micro-batches fit an H200 in bf16 without recomputation.
    "2b": Size("InternVL2-2B", "bf16", (3, 6), (32, 96), (150, 300), (4096, 8192, 12288), micro_batch=2, rows=1),
    # The tiny preset (56 px tiles, 4 tokens each): 45-130 positions per pair.
    "smoke": Size("tiny", "fp32", (3, 6), (8, 24), (12, 40), (256, 512), micro_batch=2, rows=1),
}


def log(message: str) -> None:
    print(f"[gpu_bench] {message}", flush=True)


# ---- synthetic pairs and rows -------------------------------------------------------------------


def synthetic_pairs(model_config, size: Size, seed: int) -> Iterator:
    """An endless stream of TokenizedPairs: random text ids around a block of IMG_CONTEXT
    tokens per tile, random normalised pixel tiles, random reference log-probs (about
    -0.5..-2 nats per token). Drawn lazily: a 2b pair carries up to 14 MB of pixels."""
    from megatron_mpo.data.samples import TokenizedPair

    gen = torch.Generator().manual_seed(seed)
    context = model_config.img_context_token_id
    high = min(context, model_config.language.vocab_size) - 3  # text ids stay clear of image ids
    side = model_config.vision.image_size
    per_tile = model_config.tokens_per_tile

    def draw(lo_hi: tuple[int, int]) -> int:
        return int(torch.randint(lo_hi[0], lo_hi[1] + 1, (1,), generator=gen))

    def text(n: int) -> list[int]:
        return torch.randint(1, high, (n,), generator=gen).tolist()

    i = 0
    while True:
        tiles = draw(size.tiles)
        before = draw(size.prompt_text) // 2
        after = max(1, draw(size.prompt_text) - before)
        prompt = text(before) + [context - 2] + [context] * (tiles * per_tile) + [context - 1] + text(after)
        chosen, rejected = text(draw(size.response)), text(draw(size.response))
        pixels = torch.randn(tiles, 3, side, side, generator=gen)
        ref_c = -len(chosen) * (0.5 + 1.5 * float(torch.rand((), generator=gen)))
        ref_r = -len(rejected) * (0.5 + 1.5 * float(torch.rand((), generator=gen)))
        yield TokenizedPair(key=f"bench/{i:06d}", prompt=prompt, chosen=chosen, rejected=rejected,
                            pixel_values=pixels, ref_chosen=ref_c, ref_rejected=ref_r)
        i += 1


def fill_rows(model_config, size: Size, row_length: int, rows: int, seed: int) -> list[list]:
    """``rows`` groups of pairs, each filling a packed row of ``row_length`` positions
    first-fit from a stream of synthetic pairs (a row closes after 8 pairs in a row did not
    fit, or after 256 draws; pairs that fit nowhere are dropped)."""
    from megatron_mpo.data.collate import packed_length

    stream = synthetic_pairs(model_config, size, seed)
    groups: list[list] = []
    for _ in range(rows):
        group, used, misses = [], 0, 0
        for pair in islice(stream, 256):
            length = packed_length(pair)
            if used + length <= row_length:
                group.append(pair)
                used += length
                misses = 0
            else:
                misses += 1
                if misses >= 8:
                    break
        if not group:
            raise UserError(f"--row-lengths {row_length} is shorter than every synthetic pair of this size; "
                            "use longer rows")
        groups.append(group)
    return groups


def micro_batches(groups: list[list], model_config, layout: str, row_length: int, micro_batch: int,
                  attention: str = "sdpa") -> list:
    """The step's micro-batches: one packed row of exactly ``row_length`` positions per
    group, or the groups' pairs as unpacked micro-batches of ``micro_batch`` pairs (under
    ``flex`` padded to its block size, as the trainer's ``row_layout.pad_multiple`` does)."""
    from megatron_mpo.batch import pad_to_length
    from megatron_mpo.data.collate import collate_pairs
    from megatron_mpo.models.packed_attention import FLEX_BLOCK_SIZE

    context, per_tile = model_config.img_context_token_id, model_config.tokens_per_tile
    if layout == "packed":
        out = []
        for group in groups:
            batch = collate_pairs(group, PAD_ID, context, per_tile, layout="packed", row_length=row_length,
                                  max_pairs_per_row=None)
            if batch.input_ids.shape[0] != 1:  # pragma: no cover - fill_rows keeps each group within a row
                raise AssertionError(f"{len(group)} pairs took {batch.input_ids.shape[0]} rows of {row_length}")
            out.append(pad_to_length(batch, row_length, PAD_ID))
        return out
    pairs = [p for group in groups for p in group]
    pad = FLEX_BLOCK_SIZE if attention == "flex" else 1
    return [collate_pairs(pairs[i:i + micro_batch], PAD_ID, context, per_tile, layout="unpacked", pad_multiple=pad)
            for i in range(0, len(pairs), micro_batch)]


# ---- one model, several configurations ---------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One measured configuration."""

    attention: str
    layout: str
    row_length: int

    @property
    def name(self) -> str:
        return f"{self.attention}/{self.layout}/{self.row_length}"


def model_key(plan: Plan) -> tuple[str, str]:
    """Configurations sharing a built model: the local spec's attention reads whatever mask
    it is given, so ``sdpa`` serves both layouts; TE builds its causal kernel for plain rows
    and takes a dense mask for packed ones."""
    if plan.attention == "te":
        return ("te", "arbitrary" if plan.layout == "packed" else "causal")
    return (plan.attention, "any")


def ordered_plans(attentions: list[str], layouts: list[str], row_lengths: list[int]) -> list[Plan]:
    """Every (attention, layout) at the first row length, then each attention's (and
    layout's) longer rows: a spent time budget cuts the long rows, not whole attentions."""
    first, rest = row_lengths[:1], row_lengths[1:]
    return [Plan(a, layout, s) for lengths in (first, rest) for a in attentions for layout in layouts for s in lengths]


def skip_reason(attention: str, layout: str, on_cuda: bool) -> Optional[str]:
    from megatron_mpo.models.specs import te_available

    if attention == "flex" and not on_cuda:
        return "FlexAttention has no backward on a CPU (torch raises NotImplementedError; the model would take the SDPA path)"
    if attention == "te" and not te_available():
        return "Transformer Engine is not installed"
    if attention == "te" and not on_cuda:
        return "Transformer Engine needs a GPU"
    return None


class Bench:
    """The trainer's step for one built model; :meth:`measure` runs one configuration."""

    def __init__(self, args: argparse.Namespace, size: Size, attention: str, mask: str, parallel_layout) -> None:
        from megatron_mpo import platform
        from megatron_mpo.config import from_dict
        from megatron_mpo.losses import MPOLoss
        from megatron_mpo.training.flops import FlopCounter
        from megatron_mpo.training.forward import make_forward_step
        from megatron_mpo.training.metrics import StepCounter
        from megatron_mpo.training.model_setup import build_model_chunks, model_config as arch_of
        from megatron_mpo.training.optim import build_optimizer, wrap_data_parallel
        from megatron_mpo.training.schedule import forward_backward_func

        self.args, self.size, self.layout = args, size, parallel_layout
        cfg = from_dict({
            "model": {"preset": size.preset, "freeze": args.freeze, "recompute": args.recompute,
                      "spec": "transformer_engine" if attention == "te" else "local", "attention": attention},
            "precision": {"dtype": args.dtype or size.dtype},
            # Packed rows need an explicit mask type ("arbitrary"); only TE's kernel differs by it.
            "data": {"packing": mask != "causal"},
            "train": {"steps": 1, "micro_batch": 1, "global_batch": 1, "lr": 1e-5, "warmup": 0,
                      "device": args.device, "seed": args.seed},
        }).validate()
        self.model_config = arch_of(cfg)
        self.on_cuda = platform.current().is_cuda
        # Device memory still held from an earlier model would inflate this one's peak: report it.
        self.held_before = torch.cuda.memory_allocated() if self.on_cuda else 0
        started = time.perf_counter()
        chunks = build_model_chunks(cfg, self.model_config, parallel_layout)
        self.params = sum(p.numel() for c in chunks for p in c.parameters())
        self.core_attention = type(chunks[0].language_model.decoder.layers[0].self_attention.core_attention).__name__
        self.model = wrap_data_parallel(chunks, cfg.precision)
        self.optimizer = build_optimizer(self.model, cfg.train, cfg.precision)
        self.build_s = time.perf_counter() - started
        self.mpo = MPOLoss(cfg.mpo, group=parallel_layout.data_group)
        self.counted = StepCounter()
        self.forward_step = make_forward_step(self.mpo, on_batch=self.counted.add)
        self.schedule = forward_backward_func()
        self.flops = FlopCounter(self.model_config, frozen=cfg.model.freeze)

    def step(self, mbs: list) -> tuple[float, float]:
        from megatron_mpo import platform
        from megatron_mpo.training.schedule import run_schedule

        platform.synchronize()
        started = time.perf_counter()
        self.counted.reset()
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        results = run_schedule(self.schedule, self.forward_step, self.model, mbs, PAD_ID, forward_only=False)
        self.optimizer.step()
        self.mpo.end_step(self.layout.data_group)
        platform.synchronize()
        seconds = time.perf_counter() - started
        return seconds, sum(float(r["loss"]) for r in results) / len(results)

    def measure(self, plan: Plan, groups: list[list], peak) -> dict:
        from megatron_mpo import platform

        args = self.args
        mbs = micro_batches(groups, self.model_config, plan.layout, plan.row_length, args.micro_batch, plan.attention)
        step_flops = sum(
            self.flops.step_flops(b.num_tokens(), b.input_ids.shape[1], tiles=b.pixel_values.shape[0],
                                  scored=int(b.response_mask().sum()), attended=b.attended_keys())
            for b in mbs
        )
        pair_tokens = sum(len(p.prompt) + len(p.chosen) + len(p.rejected) for group in groups for p in group)
        graphs_before = _compiled_graphs()
        records, nonfinite, unfused_flex = [], 0, False
        for step in range(args.warmup + args.steps):
            if step == args.warmup and self.on_cuda:
                torch.cuda.reset_peak_memory_stats()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                seconds, loss = self.step(mbs)
            # flex_attention run outside torch.compile (e.g. past dynamo's recompile limit)
            # materialises the full scores: the numbers would not be FlexAttention's kernel.
            unfused_flex |= any("without torch.compile" in str(w.message) for w in caught)
            if not math.isfinite(loss):
                nonfinite += 1
            measured = step >= args.warmup
            log(f"{plan.name} step {step + 1}/{args.warmup + args.steps}{'' if measured else ' (warm-up)'}: "
                f"{seconds:.3f} s, loss {loss:.4f}, {self.counted.tokens} positions, {self.counted.pairs} pairs")
            if measured:
                records.append(dict(seconds=seconds, pairs=self.counted.pairs, tokens=self.counted.tokens,
                                    tiles=self.counted.tiles))
        peak_bytes = platform.max_memory_allocated()
        step_s = statistics.median(r["seconds"] for r in records)
        pairs = records[0]["pairs"]
        return {
            **asdict(plan),
            "core_attention": self.core_attention,
            "params": self.params,
            "steps_measured": len(records),
            "step_s": step_s,
            "pairs_per_step": pairs,
            "pairs_per_row": pairs / len(groups) if plan.layout == "packed" else None,
            "micro_batches": len(mbs),
            "rows": sum(b.input_ids.shape[0] for b in mbs),
            "row_fill": sum(len(p.prompt) + len(p.chosen) + 1 + len(p.rejected) for g in groups for p in g)
            / (len(groups) * plan.row_length),
            "max_seq_len": max(b.input_ids.shape[1] for b in mbs),
            # Every step runs the same micro-batches: rates are per median step.
            "pairs_per_s": pairs / step_s,
            "tokens_per_s": records[0]["tokens"] / step_s,
            "pair_tokens_per_s": pair_tokens / step_s,
            "tflops_per_s": step_flops / step_s / 1e12,
            "mfu": step_flops / step_s / peak.flops,
            "peak_memory_gib": peak_bytes / 2**30,
            "peak_memory_source": "torch.cuda.max_memory_allocated" if self.on_cuda else "process peak RSS",
            "memory_held_before_build_gib": self.held_before / 2**30,
            "build_s": self.build_s,
            "tokens_per_pair": pair_tokens / pairs,
            "positions_per_pair": records[0]["tokens"] / pairs,
            "tiles_per_pair": records[0]["tiles"] / pairs,
            "compiled_graphs": None if graphs_before is None else _compiled_graphs() - graphs_before,
            "flex_unfused_fallback": unfused_flex,
            "nonfinite_steps": nonfinite,
        }

    def close(self) -> None:
        del self.model, self.optimizer
        gc.collect()
        if self.on_cuda:
            torch.cuda.empty_cache()


def _compiled_graphs() -> Optional[int]:
    """torch.compile graphs built so far in this process (FlexAttention compiles per shape)."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # pragma: no cover - dynamo is part of torch >= 2.0
        return None
    return int(counters["stats"]["unique_graphs"])


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ---- report -------------------------------------------------------------------------------------


def table(results: list[dict]) -> str:
    head = ("| attention | layout | S | pairs/row | step s | tokens/s | pair tokens/s | TFLOP/s | MFU "
            "| peak mem GiB | positions/pair | compiled graphs |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(results, key=lambda r: (r["row_length"], r["layout"], r["attention"])):
        if "error" in r:
            lines.append(f"| {r['attention']} | {r['layout']} | {r['row_length']} | {r['error']} |")
            continue
        per_row = "-" if r["pairs_per_row"] is None else f"{r['pairs_per_row']:.1f}"
        graphs = "-" if r["compiled_graphs"] is None else str(r["compiled_graphs"])
        lines.append(
            f"| {r['attention']} | {r['layout']} | {r['row_length']} | {per_row} | {r['step_s']:.3f} "
            f"| {r['tokens_per_s']:.0f} | {r['pair_tokens_per_s']:.0f} | {r['tflops_per_s']:.3g} "
            f"| {100 * r['mfu']:.1f} % | {r['peak_memory_gib']:.2f} | {r['positions_per_pair']:.0f} | {graphs} |"
        )
    return "\n".join(lines)


def environment() -> dict:
    import importlib.metadata as md
    import importlib.util

    def version(dist: str) -> Optional[str]:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    info = {
        "python": host_platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": version("triton"),
        "megatron_core": version("megatron-core") or version("megatron_core"),
        "transformer_engine": importlib.util.find_spec("transformer_engine") is not None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


# ---- main ---------------------------------------------------------------------------------------


def _names(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    names = [x.strip() for x in value.split(",") if x.strip()]
    bad = [x for x in names if x not in allowed]
    if bad or not names:
        raise UserError(f"{flag} {','.join(bad) or '(empty)'} is not valid; use a comma-separated subset of "
                        f"{', '.join(allowed)}")
    return list(dict.fromkeys(names))


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_bench.py", description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="2b", choices=sorted(SIZES))
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--attentions", default=",".join(ATTENTIONS),
                        help="comma-separated, run in this order: flex, sdpa, te (model.attention)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated: packed, unpacked")
    parser.add_argument("--row-lengths", help="comma-separated packed row lengths S (default: per size; "
                        "2b 4096,8192,12288, smoke 256,512)")
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="steps run first and not counted (compiles)")
    parser.add_argument("--rows", type=int, help="packed rows (micro-batches) per step (default: per size)")
    parser.add_argument("--micro-batch", type=int, help="pairs per unpacked micro-batch (default: per size)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="default: per size (2b bf16, smoke fp32)")
    parser.add_argument("--recompute", choices=("selective", "full"), help="activation recomputation")
    parser.add_argument("--freeze", default="", help="comma-separated parts to freeze: vision, projector, language")
    parser.add_argument("--budget-s", type=float,
                        help="start no new configuration after this many seconds (the rest are listed as skipped)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", help="write the results as JSON here (rewritten after every configuration)")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    args.micro_batch = args.micro_batch or size.micro_batch
    args.rows = args.rows or size.rows
    args.attentions = _names(args.attentions, ATTENTIONS, "--attentions")
    args.layouts = _names(args.layouts, LAYOUTS, "--layouts")
    args.freeze = [x.strip() for x in args.freeze.split(",") if x.strip()]
    if args.row_lengths is None:
        args.row_lengths = list(size.row_lengths)
    else:
        try:
            args.row_lengths = [int(x) for x in args.row_lengths.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--row-lengths {args.row_lengths!r} is not a comma-separated list of integers") from None
        if not args.row_lengths or min(args.row_lengths) < 16:
            raise UserError(f"--row-lengths needs integers >= 16, got {args.row_lengths or '(empty)'}")
    for name in ("steps", "micro_batch", "rows"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    return args


@exit_on_user_error
def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    size = SIZES[args.size]
    from megatron_mpo import parallel, platform
    from megatron_mpo.training.flops import device_peak, nominal_peak

    parallel_layout = parallel.initialize(1, 1, seed=args.seed, device=args.device)
    on_cuda = platform.current().is_cuda
    # MFU against the data-sheet dense bf16 peak of a known GPU (the H200's 989 TFLOP/s),
    # a measured matmul peak otherwise.
    peak = (nominal_peak(torch.cuda.get_device_name()) if on_cuda else None) or device_peak()
    env = environment()
    log(f"{size.preset} ({args.dtype or size.dtype}) on {env.get('gpu', 'CPU') if on_cuda else 'CPU'}; "
        f"peak {peak.describe()}; attentions {','.join(args.attentions)}, layouts {','.join(args.layouts)}, "
        f"row lengths {','.join(map(str, args.row_lengths))}; {args.rows} packed row(s) per step, unpacked "
        f"micro-batches of {args.micro_batch} pairs; {args.warmup} warm-up + {args.steps} measured steps each")

    skipped = []
    for attention in args.attentions:
        for layout in args.layouts:
            reason = skip_reason(attention, layout, on_cuda)
            if reason:
                skipped.append({"attention": attention, "layout": layout, "reason": reason})
                log(f"skipped {attention}/{layout}: {reason}")
    refused = {(e["attention"], e["layout"]) for e in skipped}
    plans = [p for p in ordered_plans(args.attentions, args.layouts, args.row_lengths)
             if (p.attention, p.layout) not in refused]

    started = time.perf_counter()
    report = {
        "size": args.size,
        "model": size.preset,
        "dtype": args.dtype or size.dtype,
        "device": "cuda" if on_cuda else "cpu",
        "peak": {"flops": peak.flops, "source": peak.source},
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"pairs": asdict(size)},
        "environment": env,
        "wall_s": 0.0,
        "results": {},
        "skipped": skipped,
    }

    def save() -> None:
        report["wall_s"] = time.perf_counter() - started
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2))

    rows_cache: dict[int, list[list]] = {}
    results: list[dict] = []
    failed: list[str] = []
    bench: Optional[Bench] = None
    bench_key = None
    for i, plan in enumerate(plans):
        elapsed = time.perf_counter() - started
        if args.budget_s is not None and i > 0 and elapsed > args.budget_s:
            for rest in plans[i:]:
                skipped.append({**asdict(rest), "reason": f"time budget ({args.budget_s:g} s) spent"})
            log(f"time budget spent after {elapsed:.0f} s: skipped {', '.join(p.name for p in plans[i:])}")
            break
        if plan.row_length not in rows_cache:  # the same pairs for every attention and layout
            rows_cache[plan.row_length] = fill_rows(_arch(size), size, plan.row_length, args.rows,
                                                    args.seed + plan.row_length)
        try:
            if model_key(plan) != bench_key:
                if bench is not None:
                    bench.close()
                    bench = None
                bench_key = model_key(plan)
                bench = Bench(args, size, plan.attention, bench_key[1], parallel_layout)
                log(f"built {plan.attention} model ({bench.core_attention}, {bench.params / 1e9:.2f} B parameters) "
                    f"in {bench.build_s:.1f} s")
            result = bench.measure(plan, rows_cache[plan.row_length], peak)
        except Exception as exc:  # one configuration's failure must not hide the others' numbers
            oom = _is_oom(exc)
            message = "out of memory" if oom else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log(f"{plan.name}: {message}")
            result = {**asdict(plan), "error": message}
            if not oom:
                failed.append(plan.name)
            # A fresh model for what follows (an OOM can leave DDP's buffers half-filled).
            if bench is not None:
                bench.close()
            bench, bench_key = None, None
        if "error" in result:  # outside the except block: its traceback no longer holds tensors
            gc.collect()
            if on_cuda:
                torch.cuda.empty_cache()
        results.append(result)
        report["results"][plan.name] = result
        save()
    if bench is not None:
        bench.close()
    save()
    print(table(results), flush=True)
    for entry in skipped:
        what = entry.get("row_length")
        log(f"skipped {entry['attention']}/{entry['layout']}{'' if what is None else '/' + str(what)}: {entry['reason']}")
    if args.out:
        log(f"wrote {args.out}")
    parallel.shutdown()
    nonfinite = [r["attention"] + "/" + r["layout"] + "/" + str(r["row_length"]) for r in results
                 if r.get("nonfinite_steps")]
    if nonfinite:
        raise UserError(f"non-finite losses in {', '.join(nonfinite)}: the numbers above are not trustworthy")
    if failed:
        raise UserError(f"{', '.join(failed)} failed (see the log above)")
    return report


def _arch(size: Size):
    from megatron_mpo.models.presets import get_preset

    return get_preset(size.preset)


if __name__ == "__main__":
    main()
