#!/usr/bin/env python
"""Measure the data pipeline alone: preference pairs per second into PairBatch micro-batches.

    python tools/bench_loader.py --shards shards/ --tokenizer MODEL_DIR --workers 4 --samples 2000
    python tools/bench_loader.py --synthetic 200 --synthetic-size 896x672 --image-size 448 --tokens-per-tile 256 --workers 1 --samples 200

``--synthetic N`` writes N drawn-shape records, their shards and (without --tokenizer)
a tiny tokenizer into a temporary folder first; only the loader is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mpo.console import exit_on_user_error  # noqa: E402
from megatron_mpo.data import DataConfig, LoaderPlan, build_loader, load_tokenizer  # noqa: E402
from megatron_mpo.errors import UserError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    data = DataConfig()  # the data section's defaults
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="shard folder, index.json, pattern or URL")
    p.add_argument("--tokenizer", help="model/tokenizer directory")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--samples", type=int, default=1000, help="pairs to read (timed)")
    p.add_argument("--warmup", type=int, default=0, help="micro-batches read before timing starts")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--tokens-per-tile", type=int, default=256)
    p.add_argument("--max-tiles", type=int, default=data.max_tiles)
    p.add_argument("--max-length", type=int, default=data.max_length)
    p.add_argument("--template", default="internvl2_5")
    p.add_argument("--layout", default="unpacked", choices=["unpacked", "packed"])
    p.add_argument("--shuffle-buffer", type=int, default=data.shuffle_buffer)
    p.add_argument("--synthetic", type=int, default=0, help="generate this many synthetic records first")
    p.add_argument("--synthetic-size", default="96x64", help="WxH of synthetic images")
    return p.parse_args(argv)


def _synthetic(args, workdir: str):
    from megatron_mpo.data.shard_writer import MakeShardsConfig, make_shards
    from megatron_mpo.data.synthetic import write_synthetic_mmpr
    from megatron_mpo.data.tiny_tokenizer import build_tiny_tokenizer

    try:
        w, h = (int(v) for v in args.synthetic_size.lower().split("x"))
    except ValueError:
        raise UserError(f"--synthetic-size must look like 896x672, not {args.synthetic_size!r}") from None
    meta = write_synthetic_mmpr(os.path.join(workdir, "src"), args.synthetic, image_sizes=[(w, h), (h, w)])
    shards = os.path.join(workdir, "shards")
    make_shards(MakeShardsConfig(out=shards, meta=meta, samples_per_shard=100, workers=2, progress=False), log=lambda m: None)
    tokenizer = args.tokenizer or build_tiny_tokenizer(os.path.join(workdir, "tok"))
    return shards, tokenizer


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        shards, tokenizer_dir = args.shards, args.tokenizer
        if args.synthetic:
            shards, tokenizer_dir = _synthetic(args, workdir)
        if not shards or not tokenizer_dir:
            raise UserError("give --shards and --tokenizer (or --synthetic N)")
        config = DataConfig(  # packed rows hold one pair each, as the README's figure was measured
            shards=shards, num_workers=args.workers, max_tiles=args.max_tiles, max_length=args.max_length,
            template=args.template, shuffle_buffer=args.shuffle_buffer, pairs_per_row=1,
        )
        config.validate()
        loading = LoaderPlan(image_size=args.image_size, tokens_per_tile=args.tokens_per_tile,
                             micro_batch=args.micro_batch, layout=args.layout)
        loader = build_loader(config, loading, load_tokenizer(tokenizer_dir))
        it = iter(loader)
        start_all = time.perf_counter()
        for _ in range(args.warmup):
            next(it)
        start = time.perf_counter()
        pairs = tiles = tokens = 0
        while pairs < args.samples:
            batch = next(it)
            pairs += batch.num_pairs
            tiles += int(batch.pixel_values.shape[0])
            tokens += batch.num_tokens()
        elapsed = time.perf_counter() - start
        result = {
            "pairs": pairs,
            "seconds": round(elapsed, 3),
            "pairs_per_s": round(pairs / elapsed, 2),
            "tiles_per_s": round(tiles / elapsed, 2),
            "tokens_per_s": round(tokens / elapsed, 1),
            "seconds_incl_startup": round(time.perf_counter() - start_all, 3),
            "workers": args.workers,
            "image_size": args.image_size,
            "skip_counts": loader.skip_counts,
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
