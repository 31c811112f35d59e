#!/usr/bin/env bash
# One node's share of a multi-node megatron_mpo run: starts torchrun for this node and relays
# "checkpoint and stop" requests to the training workers.
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#     examples/launch/torchrun_multinode.sh examples/recipes/internvl2_8b.yaml [section.key=value ...]
#
# Run the same command on every node (NODE_RANK 0..NNODES-1); MASTER_ADDR is node 0's address.
# Everything after the config is passed through to the trainer as overrides.
#
# Environment:
#   NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1; required when NNODES > 1), MASTER_PORT (29500),
#   NPROC_PER_NODE (gpu = every visible GPU)
#   RDZV_BACKEND  static (default: fixed NODE_RANK, torchrun --master-addr) or c10d (torchrun's
#                 dynamic rendezvous at MASTER_ADDR:MASTER_PORT; node ranks are assigned, NODE_RANK is
#                 ignored; RDZV_ID names the run, RDZV_TIMEOUT (900 s) bounds the wait for all nodes)
#   MPO_TASK      train (default: python -m megatron_mpo.train) or ref (python -m megatron_mpo.cli reference, the installed `megatron-mpo reference`)
#   MPO_STOP_FILE optional path polled every MPO_STOP_POLL seconds (5); once it exists the workers
#                 are asked to checkpoint and stop (used by slurm_mpo.sbatch; must be on a file system
#                 every node sees)
#   TORCHRUN      launcher command (default: torchrun)
#
# Stopping with a checkpoint: send SIGUSR1 or SIGTERM to THIS script (or create MPO_STOP_FILE). It
# sends SIGUSR1 to the training workers only -- the direct children of the torchrun agent -- each
# once, as soon as the worker's /proc status shows a SIGUSR1 handler (until then the worker, still
# building its model, ignores SIGUSR1; a second signal after the trainer's exit began could kill it).
# The trainer turns SIGUSR1/SIGTERM into a flag that all ranks agree on at the next step, saves a
# checkpoint and exits 0; torchrun then exits 0 as for a finished run, and the next start resumes
# through checkpoint.load=auto. With MPO_TASK=ref the request stops torchrun instead (SIGTERM);
# the reference tool skips finished shards when restarted.
# Why not signal torchrun itself: the agent treats a signal it handles (SIGTERM, SIGINT, SIGHUP,
# SIGQUIT by default) as its own death: it sends it to each worker's process group (which also hits
# the trainer's helper processes: data loader workers, the checkpoint writer's manager), waits
# --shutdown-timeout seconds (default 30, or TORCH_ELASTIC_SHUTDOWN_TIMEOUT) and SIGKILLs them. A
# signal it does not handle -- SIGUSR1 by default -- kills the agent outright. Handling SIGUSR1
# needs torchrun --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 (or PET_SIGNALS_TO_HANDLE),
# and then means the same shutdown: in torch 2.13 torchrun writes TORCHELASTIC_SIGNALS_TO_HANDLE from
# that option, so exporting TORCHELASTIC_SIGNALS_TO_HANDLE yourself has no effect.
# So torchrun starts here with SIGUSR1 ignored (an inherited disposition its workers keep until the
# trainer installs its handler) and never receives the request.
# Ctrl-C (SIGINT) stops the run the torchrun way: this script sends SIGTERM to the agent, which
# passes it on and SIGKILLs workers still running after its shutdown timeout.
set -euo pipefail

log() { printf '[torchrun_multinode %s] %s\n' "$(date '+%F %T')" "$*" >&2; }
die() { log "error: $*"; exit 2; }

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
config=$1
shift
[[ -f $config ]] || die "config file $config does not exist"

nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-0}
master_addr=${MASTER_ADDR:-127.0.0.1}
master_port=${MASTER_PORT:-29500}
nproc_per_node=${NPROC_PER_NODE:-gpu}
poll=${MPO_STOP_POLL:-5}
read -r -a torchrun_cmd <<< "${TORCHRUN:-torchrun}"

[[ $nnodes =~ ^[1-9][0-9]*$ ]] || die "NNODES must be a positive integer, got '$nnodes'"
if (( nnodes > 1 )) && [[ -z ${MASTER_ADDR:-} ]]; then
    die "NNODES=$nnodes needs MASTER_ADDR (the address of node 0)"
fi

task=${MPO_TASK:-train}
case $task in
    train) entry=(-m megatron_mpo.train) ;;
    ref) entry=(-m megatron_mpo.cli reference) ;;
    *) die "MPO_TASK must be train or ref, got '${MPO_TASK}'" ;;
esac

case ${RDZV_BACKEND:-static} in
    static)
        if ! [[ $node_rank =~ ^[0-9]+$ ]] || (( node_rank >= nnodes )); then
            die "NODE_RANK must be in 0..$((nnodes - 1)), got '$node_rank'"
        fi
        rdzv=(--nnodes "$nnodes" --node-rank "$node_rank"
              --master-addr "$master_addr" --master-port "$master_port")
        ;;
    c10d)
        rdzv=(--nnodes "$nnodes" --rdzv-backend c10d --rdzv-endpoint "$master_addr:$master_port"
              --rdzv-id "${RDZV_ID:-megatron_mpo}" --rdzv-conf "join_timeout=${RDZV_TIMEOUT:-900}")
        ;;
    *) die "RDZV_BACKEND must be static or c10d, got '${RDZV_BACKEND}'" ;;
esac

# Defaults for megatron-core on NCCL; anything already exported wins.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}   # TP/SP comm kernels in issue order
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
export PYTHONUNBUFFERED=1

cmd=("${torchrun_cmd[@]}" "${rdzv[@]}" --nproc-per-node "$nproc_per_node"
     "${entry[@]}" --config "$config" "$@")
log "$(hostname) (${RDZV_BACKEND:-static} rendezvous, $nnodes node(s)): ${cmd[*]}"

# SIGUSR1 ignored in torchrun and (inherited) its workers; a trap in this shell would instead reset
# it to the default action (terminate) in the child.
(trap '' USR1; exec "${cmd[@]}") &
agent=$!

stop_requested=0
interrupted=0
declare -A signalled=()
catches_usr1() {
    # Bit 9 (SIGUSR1 = 10) of the process's caught-signals mask: the trainer's handler is installed.
    local key value mask=""
    while read -r key value; do
        if [[ $key == SigCgt: ]]; then mask=$value; fi
    done 2>/dev/null < "/proc/$1/status" || return 1
    [[ $mask =~ ^[0-9a-fA-F]+$ ]] && (( (16#$mask >> 9) & 1 ))
}
signal_workers() {
    # The direct children of the agent are the workers (torchrun starts each in its own session);
    # their own children (data loader workers, checkpoint writer helpers) are left alone. Each
    # worker gets SIGUSR1 once, as soon as it has installed its handler: before that it still
    # ignores SIGUSR1 (model building, data setup), and after it exits Python restores the default
    # action, which a repeated signal would turn into a crash.
    local pids pid
    if command -v pgrep >/dev/null; then
        pids=$(pgrep -P "$agent" || true)
    else
        pids=$(cat /proc/"$agent"/task/*/children 2>/dev/null || true)
    fi
    for pid in $pids; do
        if [[ -z ${signalled[$pid]:-} ]] && catches_usr1 "$pid" && kill -USR1 "$pid" 2>/dev/null; then
            signalled[$pid]=1
        fi
    done
}
request_stop() {
    if (( ! stop_requested )); then
        stop_requested=1
        if [[ $task == ref ]]; then
            # The reference tool has no stop flag; it resumes shard by shard when restarted.
            log "$1: stopping the reference tool (a rerun skips finished shards)"
            kill -TERM "$agent" 2>/dev/null || true
            return
        fi
        log "$1: asking the training workers to save a checkpoint and stop"
    fi
    [[ $task == ref ]] || signal_workers
}
trap 'request_stop SIGUSR1' USR1
trap 'request_stop SIGTERM' TERM
# Ctrl-C: torchrun's own shutdown (SIGTERM to the workers, SIGKILL after its shutdown timeout).
trap 'interrupted=1; kill -TERM "$agent" 2>/dev/null || true' INT

while kill -0 "$agent" 2>/dev/null; do
    if (( ! stop_requested )) && [[ -n ${MPO_STOP_FILE:-} && -e ${MPO_STOP_FILE} ]]; then
        request_stop "stop file ${MPO_STOP_FILE}"
    elif (( stop_requested )) && [[ $task != ref ]]; then
        signal_workers   # workers that were still starting
    fi
    sleep "$poll" &
    sleeper=$!
    wait "$sleeper" 2>/dev/null || true   # returns early when a trapped signal arrives
    kill "$sleeper" 2>/dev/null || true
done
rc=0
wait "$agent" || rc=$?
if (( stop_requested )); then
    log "torchrun exited with status $rc after the stop request"
elif (( interrupted )); then
    log "interrupted; torchrun exited with status $rc"
fi
exit "$rc"
