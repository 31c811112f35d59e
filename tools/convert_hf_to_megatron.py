"""Convert a Hugging Face InternVL checkpoint into a Megatron model directory.

    python tools/convert_hf_to_megatron.py --hf DIR --out DIR [--tp N] [--pp N]

Reads the transformers-native layout (InternVLForConditionalGeneration) or the original
remote-code layout (InternVLChatModel). The output is a megatron-core dist_checkpointing
directory (+ model_config.json, tokenizer, conversion.json) that training points
``model.init`` at. It is written once by this single process and loads under any TP/PP;
--tp/--pp are checked against the architecture (heads, KV groups, layers) before anything
is written, and recorded. See megatron_mpo/conversion/convert.py.
"""

import argparse
import warnings

from megatron_mpo.errors import exit_on_user_error

# megatron-core announces its fallbacks on import (no apex / Transformer Engine on CPU);
# a converter does not use them, so keep its output to progress lines and errors.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed")
warnings.filterwarnings("ignore", message=r"full scope is deprecated")


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Hugging Face InternVL -> Megatron model directory.")
    parser.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + weights + tokenizer)")
    parser.add_argument("--out", required=True, help="new output directory (must not exist or be empty)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size to check the model against (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to check the model against (default 1)")
    parser.add_argument(
        "--vision-padded-heads", type=int, default=None,
        help="zero-pad the vision attention heads to this count (default: only when --tp does not divide them)",
    )
    args = parser.parse_args(argv)
    from megatron_mpo.conversion.convert import hf_to_megatron_dir

    hf_to_megatron_dir(args.hf, args.out, args.tp, args.pp, vision_padded_heads=args.vision_padded_heads)


if __name__ == "__main__":  # required: dist_checkpointing's writer spawns processes that re-import this file
    main()
