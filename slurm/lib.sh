# Shared by slurm/{pretrain,finetune_regions,distill}.sbatch, sourced after `cd "$REPO"` (Slurm runs a
# copy of the batch script from its spool directory, so the script's own path cannot locate this file).
#
# What it gives them: `say`, and `run_step SRUN_ARGS...`, which runs $CROSSREC_CMD (exported by the
# caller) once per srun task and handles preemption: USR1 to the batch shell (--signal=B:USR1@N) is
# forwarded to the training processes, which checkpoint and exit; the job then requeues itself, and the
# rerun resumes from the checkpoint because every command passes --resume auto.

say() { echo "[crossrec-slurm $(date +%H:%M:%S)] $*"; }

# Runs on each node under srun: the command with USR1 ignored (Slurm signals every process of the
# step, and torchrun/accelerate would die of it, as would a trainer not yet past its imports), USR1
# handed to the launcher and its crossrec_dist children, USR1/TERM survived, the command's status kept.
# shellcheck disable=SC2016
NODE_WRAPPER='
say() { echo "[crossrec-slurm $(date +%H:%M:%S) $(hostname -s)] $*"; }
say "node SLURM_NODEID=${SLURM_NODEID:-0} task SLURM_PROCID=$SLURM_PROCID: $CROSSREC_CMD"
# Across nodes, gloo (CPU) and NCCL (GPU) listen on the address this node'"'"'s hostname resolves to.
# Debian maps the hostname to 127.0.1.1: the other nodes would then be told to connect to loopback.
if [ "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ] && [ -z "${GLOO_SOCKET_IFNAME:-}${NCCL_SOCKET_IFNAME:-}" ]; then
    addr=$(getent hosts "$(hostname)" | awk "{print \$1; exit}")
    case "$addr" in
        127.*|::1|"") say "warning: hostname $(hostname) resolves to ${addr:-nothing}, a loopback address: the other nodes cannot reach this one there. Set GLOO_SOCKET_IFNAME (CPU) or NCCL_SOCKET_IFNAME (GPU) to the interface the nodes share (ip -br addr), or fix /etc/hosts" ;;
        *) say "hostname $(hostname) resolves to $addr (gloo/NCCL listen there)" ;;
    esac
fi
forward() {
    say "$1: forwarding to the training processes"
    kill -"$1" "$launcher" 2>/dev/null
    pkill -"$1" -P "$launcher" -f crossrec_dist 2>/dev/null
    return 0
}
trap "forward USR1" USR1
trap "say \"TERM: waiting for the training processes\"" TERM
( trap "" USR1; eval "exec $CROSSREC_CMD" ) &
launcher=$!
while :; do
    wait "$launcher"; rc=$?
    kill -0 "$launcher" 2>/dev/null || break
done
say "command exited with status $rc"
exit "$rc"
'

# run_step SRUN_ARGS... — srun the wrapper, wait, and on preemption requeue; exits the script with
# the step's status (0 after a successful requeue). REQUEUE_NOTE adds context to the requeue message.
run_step() {
    preempted=0
    step_pid=""
    on_signal() {
        say "caught $1"
        [ "$1" = USR1 ] && preempted=1
        [ -n "$step_pid" ] && kill -"$1" "$step_pid" 2>/dev/null   # srun forwards it to every task
        return 0
    }
    trap 'on_signal USR1' USR1
    trap 'on_signal TERM' TERM

    srun "$@" --kill-on-bad-exit=1 bash -c "$NODE_WRAPPER" &
    step_pid=$!
    # Wait for the step. After USR1, poll and repeat the signal every PREEMPT_RESEND seconds: a process
    # that was still starting (no handler yet) ignored the first one.
    local rc="" r resent=$SECONDS
    while [ -z "$rc" ]; do
        if [ "$preempted" = 1 ]; then
            sleep 1 & wait $!
            if ! kill -0 "$step_pid" 2>/dev/null; then
                wait "$step_pid"; rc=$?
            elif [ $((SECONDS - resent)) -ge "${PREEMPT_RESEND:-30}" ]; then
                say "step still running: USR1 again"
                kill -USR1 "$step_pid" 2>/dev/null; resent=$SECONDS
            fi
        else
            wait "$step_pid"; r=$?
            kill -0 "$step_pid" 2>/dev/null || rc=$r    # still alive: wait returned for a trap
            resent=$SECONDS
        fi
    done
    say "step exited with status $rc"

    if [ "$preempted" = 0 ] && [ "$rc" -ne 0 ]; then
        # A task died (a node lost, a rank killed, an error): srun --kill-on-bad-exit=1 has stopped the
        # tasks on the other nodes, so the job ends now instead of waiting in a collective for a peer
        # that is gone. Say where it can go on from.
        say "step failed with status $rc: a task ended abnormally (srun's error above names its node) and srun stopped the other nodes' tasks"
        local latest=""
        [ -n "${OUT:-}" ] && latest=$(cat "$OUT/checkpoints/latest" 2>/dev/null)
        if [ -n "$latest" ] && [ -d "$OUT/checkpoints/$latest" ]; then
            say "last checkpoint: $OUT/checkpoints/$latest; resubmit this job (same OUT) to resume from it"
        elif [ -n "${OUT:-}" ]; then
            say "no checkpoint in $OUT/checkpoints: a resubmission starts from the beginning (set train.checkpoint_every)"
        fi
    fi
    if [ "$preempted" = 1 ] && [ "$rc" -ne 0 ]; then
        say "preempted: requeueing job $SLURM_JOB_ID${REQUEUE_NOTE:+ ($REQUEUE_NOTE)}; the rerun resumes from $OUT/checkpoints/latest"
        if scontrol requeue "$SLURM_JOB_ID"; then
            sleep 60 & wait $!      # Slurm ends this script as it requeues the job
            exit 0
        fi
        say "scontrol requeue failed (submitted with --no-requeue, or JobRequeue=0?): resubmit this job to continue"
    fi
    exit "$rc"
}
