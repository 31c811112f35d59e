"""Plot loss parts, rewards, margin, accuracy and delta over steps.

    python tools/plot_metrics.py runs/a/metrics.jsonl [runs/b/metrics.jsonl ...] --out curves.png
"""

import argparse

from megatron_mpo.console import exit_on_user_error
from megatron_mpo.plotting import plot_runs


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Plot MPO training curves from metrics JSONL files.")
    parser.add_argument("metrics", nargs="+", help="metrics JSONL file(s); several runs are overlaid")
    parser.add_argument("--out", required=True, help="output PNG path")
    parser.add_argument("--labels", nargs="*", help="run names (default: file names)")
    args = parser.parse_args(argv)
    print(plot_runs(args.metrics, args.out, args.labels))


if __name__ == "__main__":
    main()
