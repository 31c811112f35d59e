"""Token lengths of the pairs under the run's template, tokenizer and tiling, and what
data.max_length would drop or cut, per dataset: read before computing reference values.

    python tools/data_lengths.py --config run.yaml [--samples 2000] [--json FILE] [section.key=value ...]

Reads up to --samples pairs spread over the shards (deterministic) and decodes no image.
"""

from megatron_mpo.console import setup_console
from megatron_mpo.console import exit_on_user_error


@exit_on_user_error
def main(argv=None) -> None:
    setup_console()
    from megatron_mpo.training.length_check import main as report_main

    report_main(argv)


if __name__ == "__main__":
    main()
