"""``megatron-mpo pairs`` as a file, for scripts that name it (same arguments)."""

import sys

from megatron_mpo.cli import as_tool

main = as_tool("pairs")

if __name__ == "__main__":  # spawned helper processes re-import this file
    sys.exit(main())
