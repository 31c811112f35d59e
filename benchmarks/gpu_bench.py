#!/usr/bin/env python
"""Training throughput, MFU and peak memory of the trainer's own step on one device.

    python benchmarks/gpu_bench.py [--size 2b|smoke] [--device auto|cuda|cpu]
                                   [--layouts packed,unpacked] [--steps 6] [--warmup 2]
                                   [--micro-batch N] [--micro-batches N] [--out FILE]

``--size 2b`` (the default) is a randomly initialised InternVL2-2B (InternViT-300M +
InternLM2-1.8B; no checkpoint, nothing to download) in bf16 with fp32 master weights at
TP=1, fed realistic preference pairs: 3-6 image tiles of 448 px (256 tokens each), a text
prompt and two responses, about 1.1k-2.2k tokens per pair (prompt + chosen + rejected).
``--size smoke`` is the tiny preset in fp32: seconds on a CPU, for the CPU test
``tests/test_gpu_kit.py``.

The numbers mean what the trainer's metrics mean because the step *is* the trainer's step:
``build_model_chunks`` -> ``wrap_data_parallel`` (megatron-core DDP) -> ``build_optimizer``
(distributed optimizer) -> ``make_forward_step`` with ``MPOLoss`` -> ``run_schedule`` with
megatron-core's ``forward_backward_func`` -> ``optimizer.step()``, on micro-batches collated
by the data pipeline's own collators (``collate_packed`` / ``collate_unpacked``) from
synthetic token ids, random pixel tiles and random reference log-probs. Collation is done
before timing (the trainer's loader workers do it in parallel with the step); the host to
device copy of every micro-batch is inside the step, as in training.

Each layout builds a fresh model. Warm-up steps are excluded; the table reports medians
over the measured steps. MFU is model FLOPs (``FlopCounter``, per micro-batch with its own
sequence length, no recomputation counted) over the device's nominal dense bf16 peak
(``nominal_peak``; an unknown GPU or a CPU gets a measured matmul peak, named in the output).
Peak memory is ``torch.cuda.max_memory_allocated`` over the measured steps (model, fp32
master weights, Adam moments, gradients and activations); on a CPU it is the process's peak
RSS, which is not comparable.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from megatron_mpo.errors import UserError, exit_on_user_error  # noqa: E402

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
    micro_batch: int  # pairs per micro-batch
    micro_batches: int  # micro-batches per optimizer step


SIZES = {
    # 3-6 tiles x 256 = 768-1536 image tokens + 32-96 prompt text + 2 x 150-300 response
    # tokens: 1.1k-2.2k tokens per pair. 8 pairs per step in 4 micro-batches of 2 (well
    # inside an H200's memory in bf16 without recomputation).
    "2b": Size("InternVL2-2B", "bf16", (3, 6), (32, 96), (150, 300), micro_batch=2, micro_batches=4),
    # The tiny preset (56 px tiles, 4 tokens each): seconds per run on a CPU.
    "smoke": Size("tiny", "fp32", (3, 6), (8, 24), (12, 40), micro_batch=2, micro_batches=2),
}


def log(message: str) -> None:
    print(f"[gpu_bench] {message}", flush=True)


# ---- synthetic pairs ------------------------------------------------------------------------


def synthetic_pairs(model_config, size: Size, count: int, seed: int) -> list:
    """``count`` TokenizedPairs: random text ids around a block of IMG_CONTEXT tokens per tile,
    random normalised pixel tiles, random reference log-probs (about -0.5..-2 nats per token)."""
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

    pairs = []
    for i in range(count):
        tiles = draw(size.tiles)
        before = draw(size.prompt_text) // 2
        after = max(1, draw(size.prompt_text) - before)
        prompt = text(before) + [context - 2] + [context] * (tiles * per_tile) + [context - 1] + text(after)
        chosen, rejected = text(draw(size.response)), text(draw(size.response))
        pixels = torch.randn(tiles, 3, side, side, generator=gen)
        ref_c = -len(chosen) * (0.5 + 1.5 * float(torch.rand((), generator=gen)))
        ref_r = -len(rejected) * (0.5 + 1.5 * float(torch.rand((), generator=gen)))
        pairs.append(TokenizedPair(key=f"bench/{i:06d}", prompt=prompt, chosen=chosen, rejected=rejected,
                                   pixel_values=pixels, ref_chosen=ref_c, ref_rejected=ref_r))
    return pairs


def collate(pairs: list, model_config, layout: str, pad_multiple: int):
    """The data pipeline's collator for ``layout`` (the trainer's loader calls the same one)."""
    from megatron_mpo.data.collate import collate_packed, collate_unpacked

    fn = collate_packed if layout == "packed" else collate_unpacked
    return fn(pairs, PAD_ID, model_config.img_context_token_id, model_config.tokens_per_tile, pad_multiple)


# ---- one layout -------------------------------------------------------------------------------


def bench_layout(args: argparse.Namespace, size: Size, layout: str, parallel_layout, peak) -> dict:
    """Build model + optimizer for ``layout``, run warm-up and measured steps, return medians."""
    from megatron_mpo import platform
    from megatron_mpo.config import from_dict
    from megatron_mpo.losses import MPOLoss
    from megatron_mpo.training.flops import FlopCounter
    from megatron_mpo.training.forward import make_forward_step
    from megatron_mpo.training.metrics import StepCounter
    from megatron_mpo.training.model_setup import build_model_chunks, model_config as arch_of
    from megatron_mpo.training.optim import build_optimizer, wrap_data_parallel
    from megatron_mpo.training.precision import sequence_multiple
    from megatron_mpo.training.schedule import forward_backward_func, run_schedule

    cfg = from_dict({
        "model": {"preset": size.preset, "freeze": args.freeze, "recompute": args.recompute},
        "precision": {"dtype": args.dtype or size.dtype},
        "data": {"packing": layout == "packed"},
        "train": {"steps": args.warmup + args.steps, "micro_batch": args.micro_batch,
                  "global_batch": args.micro_batch * args.micro_batches, "lr": 1e-5, "warmup": 0,
                  "device": args.device, "seed": args.seed},
    }).validate()
    model_config = arch_of(cfg)
    on_cuda = platform.current().is_cuda
    # Device memory still held from an earlier layout would inflate this one's peak: report it.
    held_before = torch.cuda.memory_allocated() if on_cuda else 0
    chunks = build_model_chunks(cfg, model_config, parallel_layout)
    params = sum(p.numel() for c in chunks for p in c.parameters())
    model = wrap_data_parallel(chunks, cfg.precision)
    optimizer = build_optimizer(model, cfg.train, cfg.precision)
    mpo = MPOLoss(cfg.mpo.loss_config(), group=parallel_layout.data_group)
    counted = StepCounter()
    forward_step = make_forward_step(mpo, on_batch=counted.add)
    schedule = forward_backward_func()
    flops = FlopCounter(model_config, frozen=cfg.model.freeze)
    pad_multiple = sequence_multiple(cfg.parallel.tensor, cfg.parallel.sequence, None)

    # A pool of distinct steps (lengths and tile counts vary between them), cycled.
    per_step = args.micro_batch * args.micro_batches
    distinct = min(args.warmup + args.steps, 4)
    pairs = synthetic_pairs(model_config, size, distinct * per_step, seed=args.seed)
    steps_pool = []
    for s in range(distinct):
        step_pairs = pairs[s * per_step:(s + 1) * per_step]
        mbs = [collate(step_pairs[m * args.micro_batch:(m + 1) * args.micro_batch], model_config, layout, pad_multiple)
               for m in range(args.micro_batches)]
        step_flops = sum(
            flops.step_flops(b.num_tokens(), b.input_ids.shape[1], tiles=b.pixel_values.shape[0],
                             scored=int(b.response_mask().sum()))
            for b in mbs
        )
        pair_tokens = sum(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in step_pairs)
        steps_pool.append((mbs, step_flops, pair_tokens))

    records = []
    nonfinite = 0
    for step in range(args.warmup + args.steps):
        mbs, step_flops, pair_tokens = steps_pool[step % distinct]
        if step == args.warmup and on_cuda:
            torch.cuda.reset_peak_memory_stats()
        platform.synchronize()
        started = time.perf_counter()
        counted.reset()
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        results = run_schedule(schedule, forward_step, model, mbs, PAD_ID, forward_only=False)
        optimizer.step()
        mpo.end_step(parallel_layout.data_group)
        platform.synchronize()
        seconds = time.perf_counter() - started
        loss = sum(float(r["loss"]) for r in results) / len(results)
        if not math.isfinite(loss):
            nonfinite += 1
        measured = step >= args.warmup
        log(f"{layout} step {step + 1}/{args.warmup + args.steps}{'' if measured else ' (warm-up)'}: "
            f"{seconds:.3f} s, loss {loss:.4f}, {counted.tokens} positions, {counted.tiles} tiles")
        if measured:
            records.append(dict(seconds=seconds, pairs=counted.pairs, tokens=counted.tokens,
                                pair_tokens=pair_tokens, tiles=counted.tiles, scored=counted.scored,
                                flops=step_flops, loss=loss))
    peak_bytes = platform.max_memory_allocated()

    def median(key: str) -> float:
        return statistics.median(r[key] / r["seconds"] for r in records)

    step_s = statistics.median(r["seconds"] for r in records)
    result = {
        "layout": layout,
        "params": params,
        "steps_measured": len(records),
        "step_s": step_s,
        "pairs_per_s": median("pairs"),
        "tokens_per_s": median("tokens"),  # positions computed (padding included), as the trainer logs
        "pair_tokens_per_s": median("pair_tokens"),  # prompt + chosen + rejected: equal work across layouts
        "tflops_per_s": median("flops") / 1e12,
        "mfu": median("flops") / peak.flops,
        "peak_memory_gib": peak_bytes / 2**30,
        "peak_memory_source": "torch.cuda.max_memory_allocated" if on_cuda else "process peak RSS",
        "memory_held_before_build_gib": held_before / 2**30,
        "tokens_per_pair": statistics.mean(r["pair_tokens"] / r["pairs"] for r in records),
        "positions_per_pair": statistics.mean(r["tokens"] / r["pairs"] for r in records),
        "tiles_per_pair": statistics.mean(r["tiles"] / r["pairs"] for r in records),
        "max_seq_len": max(b.input_ids.shape[1] for mbs, _, _ in steps_pool for b in mbs),
        "nonfinite_steps": nonfinite,
        "mean_loss": statistics.mean(r["loss"] for r in records),
    }
    del model, optimizer, chunks, steps_pool, pairs, results
    gc.collect()
    if on_cuda:
        torch.cuda.empty_cache()
    return result


# ---- report -------------------------------------------------------------------------------------


def table(results: list[dict]) -> str:
    head = ("| layout | pairs/s | tokens/s | pair tokens/s | TFLOP/s | MFU | step s | peak mem GiB "
            "| tokens/pair | positions/pair | tiles/pair |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        lines.append(
            f"| {r['layout']} | {r['pairs_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['pair_tokens_per_s']:.0f} "
            f"| {r['tflops_per_s']:.3g} | {100 * r['mfu']:.1f} % | {r['step_s']:.3f} | {r['peak_memory_gib']:.2f} "
            f"| {r['tokens_per_pair']:.0f} | {r['positions_per_pair']:.0f} | {r['tiles_per_pair']:.2f} |"
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
        "megatron_core": version("megatron-core") or version("megatron_core"),
        "transformer_engine": importlib.util.find_spec("transformer_engine") is not None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info


# ---- main ---------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_bench.py", description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="2b", choices=sorted(SIZES))
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated: packed, unpacked")
    parser.add_argument("--steps", type=int, default=6, help="measured optimizer steps per layout")
    parser.add_argument("--warmup", type=int, default=2, help="steps run first and not counted")
    parser.add_argument("--micro-batch", type=int, help="pairs per micro-batch (default: per size)")
    parser.add_argument("--micro-batches", type=int, help="micro-batches per step (default: per size)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="default: per size (2b bf16, smoke fp32)")
    parser.add_argument("--recompute", choices=("selective", "full"), help="activation recomputation")
    parser.add_argument("--freeze", default="", help="comma-separated parts to freeze: vision, projector, language")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    args.micro_batch = args.micro_batch or size.micro_batch
    args.micro_batches = args.micro_batches or size.micro_batches
    args.layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    args.freeze = [x.strip() for x in args.freeze.split(",") if x.strip()]
    bad = [x for x in args.layouts if x not in LAYOUTS]
    if bad or not args.layouts:
        raise UserError(f"--layouts {','.join(bad) or '(empty)'} is not valid; use a comma-separated subset of "
                        f"{', '.join(LAYOUTS)}")
    for name in ("steps", "micro_batch", "micro_batches"):
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
        f"peak {peak.describe()}; {args.micro_batches} micro-batches x {args.micro_batch} pairs per step, "
        f"{args.warmup} warm-up + {args.steps} measured steps per layout")
    results = []
    started = time.perf_counter()
    for layout in args.layouts:
        results.append(bench_layout(args, size, layout, parallel_layout, peak))
    report = {
        "size": args.size,
        "model": size.preset,
        "dtype": args.dtype or size.dtype,
        "device": "cuda" if on_cuda else "cpu",
        "peak": {"flops": peak.flops, "source": peak.source},
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"pairs": asdict(size)},
        "environment": env,
        "wall_s": time.perf_counter() - started,
        "results": {r["layout"]: r for r in results},
    }
    print(table(results), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        log(f"wrote {args.out}")
    parallel.shutdown()
    bad = [r["layout"] for r in results if r["nonfinite_steps"]]
    if bad:
        raise UserError(f"non-finite losses in layout(s) {', '.join(bad)}: the numbers above are not trustworthy")
    return report


if __name__ == "__main__":
    main()
