"""``megatron-mpo convert`` and ``megatron-mpo export``: Hugging Face <-> Megatron model dirs.

    megatron-mpo convert --hf DIR (--out DIR | --config run.yaml) [--tp N] [--pp N]
    megatron-mpo export (--ckpt DIR | --config run.yaml) --out DIR [--format native|internvl-chat]

``convert`` reads the transformers-native layout (InternVLForConditionalGeneration) or the
original remote-code layout (InternVLChatModel) and writes a megatron-core dist_checkpointing
directory (+ model_config.json, tokenizer, conversion.json) that training points
``model.init`` at. One process writes it and it loads under any TP/PP; --tp/--pp are checked
against the architecture (heads, KV groups, layers) before anything is written. The chat
template comes from the checkpoint's files, not its folder name.

``export`` writes a converted model dir, a training checkpoint (save/step_N) or a run's save
dir (the checkpoint its ``latest`` names) as ``native`` (transformers) or ``internvl-chat``
(the original layout). Tensors are bit-exact in the chosen dtype (auto: the dtype of the
checkpoint it was converted from, else float32). See megatron_mpo/conversion/convert.py.
"""

from __future__ import annotations

import argparse
from typing import Optional

from megatron_mpo.config_args import add_config_keys, parse_with_config
from megatron_mpo.console import exit_on_user_error, setup_console

__all__ = ["HF_KEYS", "EXPORT_KEYS", "hf_parser", "export_parser", "hf_to_megatron", "megatron_to_hf"]

# The run config's keys that are the flags' defaults with --config.
HF_KEYS = {"out": "model.init", "tp": "parallel.tensor", "pp": "parallel.pipeline", "template": "data.template"}
EXPORT_KEYS = {"ckpt": "checkpoint.save"}


def hf_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Hugging Face InternVL -> Megatron model directory.")
    parser.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + weights + tokenizer)")
    parser.add_argument("--out", required=True, help="new output directory (must not exist or be empty)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check the model against "
                        "(default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to check the model against "
                        "(default 1)")
    parser.add_argument(
        "--vision-padded-heads", type=int, default=None,
        help="zero-pad the vision attention heads to this count (default: only when --tp does not divide them)",
    )
    parser.add_argument(
        "--template", default=None,
        help="chat template to record (default: the one the checkpoint's config.json or chat template names)",
    )
    add_config_keys(parser, HF_KEYS)
    return parser


def export_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Megatron model directory or checkpoint -> Hugging Face "
                                     "InternVL.")
    parser.add_argument("--ckpt", required=True, help="megatron model directory, training checkpoint "
                        "(save/step_N) or a run's save dir (the checkpoint its latest names)")
    parser.add_argument("--out", required=True, help="new output directory (must not exist or be empty)")
    parser.add_argument("--format", default="native", choices=["native", "internvl-chat"],
                        help="native: transformers InternVLForConditionalGeneration (default); "
                             "internvl-chat: original InternVLChatModel layout")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size limit (default 5GB)")
    add_config_keys(parser, EXPORT_KEYS)
    return parser


@exit_on_user_error
def hf_to_megatron(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> None:
    setup_console()
    args = parse_with_config(hf_parser(prog), argv, HF_KEYS)
    from megatron_mpo.conversion.convert import hf_to_megatron_dir

    hf_to_megatron_dir(args.hf, args.out, args.tp, args.pp, vision_padded_heads=args.vision_padded_heads,
                       template=args.template)


@exit_on_user_error
def megatron_to_hf(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> None:
    setup_console()
    args = parse_with_config(export_parser(prog), argv, EXPORT_KEYS)
    from megatron_mpo.conversion.convert import megatron_dir_to_hf

    megatron_dir_to_hf(args.ckpt, args.out, args.format, dtype=args.dtype, max_shard_size=args.max_shard_size)
