# Shared by the IDUN/slurmT/*.slurm templates (sourced, not run).
#
#   DRY_RUN=1 bash IDUN/slurmT/ddpm_128_bravo.slurm    prints the exact command instead of running it
#   EXTRA_ARGS="--epochs 100" sbatch IDUN/slurmT/...    appends flags to the command
#
# Paths come from the environment (never a user folder in a template):
#   MEDGEN_DATA_ROOT, MEDGEN_OUTPUT_ROOT (required on the cluster; see config/paths.py), MEDGEN_CACHE,
#   MEDGEN_REPO (default: the folder sbatch was called from), MEDGEN_PYTHON (default: $MEDGEN_REPO/.venv/bin/python).
#
# Preemption: the templates ask SLURM for SIGUSR1 90 s before the time limit (--signal=B:SIGUSR1@90, to this
# batch shell). The trap touches <run>/.preempt; the trainer sees it at its next log interval (every rank
# agrees through one all-reduce), checkpoints, and leaves <run>/.requeue; this script then requeues the job,
# which starts again with the same job id, so the same run folder, and --resume auto continues it.

REPO="${MEDGEN_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
PY="${MEDGEN_PYTHON:-$REPO/.venv/bin/python}"
SCONTROL="${SCONTROL:-scontrol}"
JOB_ID="${SLURM_JOB_ID:-local}"
cd "$REPO"

if [ -n "${DRY_RUN:-}" ]; then
    for var in MEDGEN_OUTPUT_ROOT MEDGEN_DATA_ROOT; do
        [ -n "${!var:-}" ] || echo "warning: $var is not set; the command below shows it as \$$var, and a real run would stop (see config/paths.py)" >&2
    done
    : "${MEDGEN_OUTPUT_ROOT:=\$MEDGEN_OUTPUT_ROOT}" "${MEDGEN_DATA_ROOT:=\$MEDGEN_DATA_ROOT}"
else
    : "${MEDGEN_OUTPUT_ROOT:?set MEDGEN_OUTPUT_ROOT (output root on the cluster, see config/paths.py)}"
    : "${MEDGEN_DATA_ROOT:?set MEDGEN_DATA_ROOT (data root on the cluster, see config/paths.py)}"
fi
export MEDGEN_OUTPUT_ROOT MEDGEN_DATA_ROOT

# one line, shell-quoted, so a dry run shows exactly what would run
show() { printf '%q ' "$@" | sed 's/ $//'; echo; }

# torchrun under srun: one launcher per node, ranks assigned by c10d rendezvous (global ranks across nodes,
# never the local rank); single GPU: the process runs directly under this shell.
launcher() {
    local gpus=$1
    if [ "$gpus" -le 1 ] && [ "${SLURM_NNODES:-1}" -le 1 ]; then
        echo "$PY"
        return
    fi
    local head
    head=$( (scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null || echo localhost) | head -n 1)
    echo "srun --ntasks-per-node=1 --kill-on-bad-exit=1 $PY -m torch.distributed.run --nnodes=${SLURM_NNODES:-1}" \
         "--nproc_per_node=$gpus --rdzv_backend=c10d --rdzv_endpoint=$head:$((29500 + ${SLURM_JOB_ID:-0} % 1000))" \
         "--rdzv_id=$JOB_ID"
}

# run_training GPUS RUN_DIR SCRIPT ARGS...: run (or print), forward SIGUSR1 as <run>/.preempt, requeue when asked
run_training() {
    local gpus=$1 run_dir=$2
    shift 2
    # shellcheck disable=SC2206
    local cmd=($(launcher "$gpus") "$@" ${EXTRA_ARGS:-})
    if [ -n "${DRY_RUN:-}" ]; then
        show "${cmd[@]}"
        return 0
    fi
    mkdir -p "$run_dir"
    trap "touch '$run_dir/.preempt'; echo 'SIGUSR1: asking the trainer to checkpoint and stop'" USR1
    set +e
    "${cmd[@]}" &
    local pid=$! status=0
    while true; do
        wait "$pid"
        status=$?
        kill -0 "$pid" 2>/dev/null || break   # wait was interrupted by the trap: keep waiting
    done
    set -e
    if [ -f "$run_dir/.requeue" ]; then
        rm -f "$run_dir/.requeue"
        echo "preempted: requeueing job $JOB_ID (it resumes from the last checkpoint)"
        "$SCONTROL" requeue "$JOB_ID"
        return 0
    fi
    return "$status"
}

# run_resumable ARGS...: a job that keeps its finished work on disk (generation): requeue on SIGUSR1
run_resumable() {
    # shellcheck disable=SC2206
    local cmd=("$PY" "$@" ${EXTRA_ARGS:-})
    if [ -n "${DRY_RUN:-}" ]; then
        show "${cmd[@]}"
        return 0
    fi
    trap "echo 'SIGUSR1: requeueing; finished samples are kept'; \"$SCONTROL\" requeue \"$JOB_ID\"" USR1
    "${cmd[@]}"
}
