"""Score sampled responses and write MPO preference pairs in MMPR format (step 2).

    python tools/build_pairs.py --samples samples/ --out pairs/ [--max-pairs-per-question 15]

Correctness pairs (positives x negatives) for questions with a ground truth, Dropout NTP
pairs for those without; pairs/meta.json goes straight into tools/make_shards.py, and
pairs/summary.json holds the counts.
"""

from megatron_mpo.console import setup_console
from megatron_mpo.console import exit_on_user_error


@exit_on_user_error
def main(argv=None) -> None:
    setup_console()
    from megatron_mpo.generation.cli import pairs_main

    pairs_main(argv)


if __name__ == "__main__":
    main()
