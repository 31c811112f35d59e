import sys

from megatron_mpo.plan.cli import main

sys.exit(main())
