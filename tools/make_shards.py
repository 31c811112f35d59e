#!/usr/bin/env python
"""Turn MMPR-style preference data (meta.json + JSONL + images) into WebDataset shards.

    python tools/make_shards.py --meta meta.json --out shards/ [--samples-per-shard 1000] [--seed 0] [--workers 8]
    python tools/make_shards.py --jsonl data.jsonl --image-root images/ --name mydata --out shards/

A non-empty --out is refused unless --overwrite (which replaces the folder whole, only once
the new shards are complete). Images outside the image root (absolute paths, '..',
symlinks out) are refused as outside_root unless --allow-outside-root.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_mpo.console import exit_on_user_error  # noqa: E402
from megatron_mpo.data.shard_writer import MakeShardsConfig, make_shards  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--meta", help="MMPR meta.json: {name: {root, annotation, repeat_time, ...}}")
    source.add_argument("--jsonl", help="one annotation file instead of a meta file")
    parser.add_argument("--image-root", help="image folder of --jsonl (default: the file's folder)")
    parser.add_argument("--name", help="dataset name of --jsonl (default: the file's stem)")
    parser.add_argument("--out", required=True, help="output folder for shard-NNNNNN.tar, index.json, refused.jsonl")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="seeds repeat_time sampling and the sample order")
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out (whole, once the new shards are complete)")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="read images outside the image root (absolute paths, '..', symlinks out)")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> None:
    args = parse_args(argv)
    make_shards(
        MakeShardsConfig(
            out=args.out,
            meta=args.meta,
            jsonl=args.jsonl,
            image_root=args.image_root,
            name=args.name,
            samples_per_shard=args.samples_per_shard,
            seed=args.seed,
            workers=args.workers,
            progress=not args.quiet,
            overwrite=args.overwrite,
            allow_outside_root=args.allow_outside_root,
        )
    )


if __name__ == "__main__":
    main()
