"""Sample responses of your own InternVL for a question set (MPO pair construction, step 1).

    [torchrun --nproc-per-node N] tools/sample_responses.py --questions meta.json --model DIR --out samples/
        [--engine transformers|vllm] [-n 8] [--temperature 1.0] [--top-k 50] [--max-new-tokens 2048] [--seed 0]

Questions are split over the ranks; rerun the same command to finish a killed run. Then
tools/build_pairs.py. See README "Make your own preference data" and megatron_mpo/generation/.
"""

from megatron_mpo.console import setup_console
from megatron_mpo.console import exit_on_user_error

setup_console()  # at module level: dist_checkpointing's helper processes re-import this file


@exit_on_user_error
def main(argv=None) -> None:
    from megatron_mpo.generation.cli import sample_main

    sample_main(argv)


if __name__ == "__main__":  # required: spawned helper processes re-import this file
    main()
