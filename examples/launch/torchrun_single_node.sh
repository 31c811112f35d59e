#!/usr/bin/env bash
# megatron_mpo on one machine (all its GPUs by default).
#
#   examples/launch/torchrun_single_node.sh examples/recipes/internvl2_8b.yaml [section.key=value ...]
#   MPO_TASK=ref examples/launch/torchrun_single_node.sh examples/recipes/internvl2_8b.yaml   # reference log-probs
#
# NPROC_PER_NODE (default: every visible GPU) and MASTER_PORT (default 29500; pick another to run
# two jobs side by side) are read from the environment. SIGUSR1 / SIGTERM to this script: the
# trainer saves a checkpoint and stops (see torchrun_multinode.sh, which this delegates to).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 RDZV_BACKEND=static
export MASTER_PORT=${MASTER_PORT:-29500}
exec "$here/torchrun_multinode.sh" "$@"
