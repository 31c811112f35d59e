"""Precompute reference log-probs of the initial policy for every training sample.

    torchrun --nproc-per-node N tools/precompute_ref_logps.py --config FILE [section.key=value ...]

Uses the training config (model.init, data.*, parallel.*, precision.*); writes one
sidecar per shard into data.ref_logps. Rerunning resumes: complete shards are skipped.
"""

import argparse

from megatron_mpo.config import load_config
from megatron_mpo.console import setup_console
from megatron_mpo.console import exit_on_user_error


@exit_on_user_error
def main(argv=None) -> None:
    setup_console()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="training YAML config")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from megatron_mpo.reference import precompute

    precompute(cfg)


if __name__ == "__main__":
    main()
