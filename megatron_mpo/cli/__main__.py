"""``python -m megatron_mpo.cli COMMAND ...``: ``megatron-mpo`` without the installed script."""

import sys

from megatron_mpo.cli import main

if __name__ == "__main__":  # spawned helper processes re-import this file
    sys.exit(main())
