"""Export a Megatron model directory or training checkpoint to a Hugging Face directory.

    python tools/convert_megatron_to_hf.py --ckpt DIR --out DIR [--format native|internvl-chat]
        [--dtype auto|float32|bfloat16|float16] [--max-shard-size 5GB]

``native`` loads with transformers' InternVLForConditionalGeneration.from_pretrained;
``internvl-chat`` is the original InternVLChatModel layout (remote code). --ckpt may be a
converted model directory, a training checkpoint (save/step_N) or a run's save dir (the
checkpoint its ``latest`` names). Tensors are bit-exact in the chosen dtype (auto: the
dtype of the checkpoint it was converted from, else float32). See
megatron_mpo/conversion/convert.py.
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
    parser = argparse.ArgumentParser(description="Megatron model directory -> Hugging Face InternVL.")
    parser.add_argument("--ckpt", required=True, help="megatron model directory, training checkpoint "
                        "(save/step_N) or a run's save dir (the checkpoint its latest names)")
    parser.add_argument("--out", required=True, help="new output directory (must not exist or be empty)")
    parser.add_argument("--format", default="native", choices=["native", "internvl-chat"],
                        help="native: transformers InternVLForConditionalGeneration (default); "
                             "internvl-chat: original InternVLChatModel layout")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size limit (default 5GB)")
    args = parser.parse_args(argv)
    from megatron_mpo.conversion.convert import megatron_dir_to_hf

    megatron_dir_to_hf(args.ckpt, args.out, args.format, dtype=args.dtype, max_shard_size=args.max_shard_size)


if __name__ == "__main__":  # required: spawned helper processes re-import this file
    main()
