"""Write a randomly initialised model preset as a Megatron model directory.

    python tools/init_checkpoint.py --preset tiny --tokenizer DIR --out DIR [--seed N]

For demos and tests: the result is what model.init points at, like a converted checkpoint.
"""

import argparse

from megatron_mpo.console import setup_console
from megatron_mpo.console import exit_on_user_error


@exit_on_user_error
def main(argv=None) -> None:
    setup_console()
    parser = argparse.ArgumentParser(description="Initialise a model preset as a Megatron model directory.")
    parser.add_argument("--preset", required=True, help="model preset name (e.g. tiny, InternVL2-1B)")
    parser.add_argument("--tokenizer", required=True, help="directory with tokenizer.json or tokenizer.model")
    parser.add_argument("--out", required=True, help="new output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from megatron_mpo.training.model_dir import init_model_dir

    print(init_model_dir(args.preset, args.tokenizer, args.out, seed=args.seed))


if __name__ == "__main__":
    main()
