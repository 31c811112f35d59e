"""Convert a Hugging Face InternVL checkpoint into a Megatron model directory.

    python tools/convert_hf_to_megatron.py --hf DIR --out DIR [--tp N] [--pp N]

Reads the transformers-native layout (InternVLForConditionalGeneration) or the original
remote-code layout (InternVLChatModel). The output is a megatron-core dist_checkpointing
directory (+ model_config.json, tokenizer, conversion.json) that training points
``model.init`` at. It is written once by this single process and loads under any TP/PP;
--tp/--pp are checked against the architecture (heads, KV groups, layers) before anything
is written, and recorded. The chat template comes from the checkpoint's files, not its
folder name (megatron_mpo/conversion/chat_template.py). See megatron_mpo/conversion/convert.py.
"""

import argparse

from megatron_mpo.console import setup_console
from megatron_mpo.console import exit_on_user_error

# Known-harmless megatron-core / torch notices stay out of the output (megatron_mpo/console.py);
# at module level, so that the helper processes dist_checkpointing spawns (which re-import
# this file, not main) filter them too.
setup_console()


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
    parser.add_argument(
        "--template", default=None,
        help="chat template to record (default: the one the checkpoint's config.json or chat template names)",
    )
    args = parser.parse_args(argv)
    from megatron_mpo.conversion.convert import hf_to_megatron_dir

    hf_to_megatron_dir(args.hf, args.out, args.tp, args.pp, vision_padded_heads=args.vision_padded_heads,
                       template=args.template)


if __name__ == "__main__":  # required: dist_checkpointing's writer spawns processes that re-import this file
    main()
