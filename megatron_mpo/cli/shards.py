"""``megatron-mpo shards``: MMPR-style preference data (meta.json + JSONL + images) -> WebDataset shards.

    megatron-mpo shards --meta meta.json (--out DIR | --config run.yaml) [--samples-per-shard 1000] [--workers 8]
    megatron-mpo shards --jsonl data.jsonl --image-root images/ --name mydata --out DIR

A non-empty --out is refused unless --overwrite (which replaces the folder whole, only once
the new shards are complete). Images outside the image root (absolute paths, '..',
symlinks out) are refused as outside_root unless --allow-outside-root.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

from megatron_mpo.config_args import add_config_keys, parse_with_config
from megatron_mpo.console import exit_on_user_error
from megatron_mpo.errors import UserError

__all__ = ["KEYS", "build_parser", "main"]

KEYS = {"out": "data.shards"}


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    add_config_keys(parser, KEYS)
    return parser


@exit_on_user_error
def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> None:
    args = parse_with_config(build_parser(prog), argv, KEYS)
    if not isinstance(args.out, str) or any(mark in args.out for mark in ("{", "://", "pipe:")) \
            or args.out.endswith((".tar", "index.json")):
        raise UserError(f"{args.out!r} is not a folder to write shards into (data.shards may name a pattern or URL "
                        "to train on): give --out DIR")
    from megatron_mpo.data.shard_writer import MakeShardsConfig, make_shards

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
