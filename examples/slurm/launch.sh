# Sourced by the sbatch scripts in this folder after they set:
#   CONFIG          the run's YAML config
#   RUN_DIR         run folder: checkpoints, metrics; keep it the same across requeues so the run resumes
#   PROCS_PER_TASK  ranks started by each srun task (one task per node: the GPUs per node)
#   OVERRIDES       (array) dotted config overrides; the sbatch script's own arguments are appended
# It does the cluster side only: folders, rendezvous on the first node, network interface, and the
# save-then-requeue dance before the time limit; then every task runs examples/slurm/task.sh,
# which starts torchrun and `megatron-dapo train`.
#
# Variables that matter (all optional):
#   MEGATRON_DAPO_HOME    checkout to run from (default: the folder sbatch was called in)
#   MEGATRON_DAPO_IFNAME  network interface for gloo and NCCL (default: the one that reaches the first node)
#   MEGATRON_DAPO_PORT    torchrun's rendezvous port on the first node (default: from the job id; a
#                         MASTER_PORT inherited from the submitting shell is not used)
#   VENV                  a virtualenv to activate on every node (default: none, use PATH's python)

set -euo pipefail
# A signal before the run folder is known (the config is read below; a script's data step may come before) is
# kept, and asked for once request_stop can write it: the default action would end this shell, with no save
# and no requeue.
trap 'EARLY_STOP=${EARLY_STOP:-USR1}' USR1
trap 'EARLY_STOP=${EARLY_STOP:-TERM}' TERM
MEGATRON_DAPO_HOME=${MEGATRON_DAPO_HOME:-$SLURM_SUBMIT_DIR}
cd "$MEGATRON_DAPO_HOME"
if [ -n "${VENV:-}" ]; then
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
fi
# The run folder as the run reads it: a trainer.run_dir among the overrides or the script's arguments wins over
# RUN_DIR (the later override wins), read as YAML, a trainer={run_dir: ...} mapping included. The STOP file below
# must go where the run looks for it. A config that does not load stops the job here, before any node starts.
# A WORLD_SIZE the submitting shell exported would be checked against the layout here: it is not this job's.
RUN_DIR=$(env -u WORLD_SIZE python -m megatron_dapo config --get trainer.run_dir "$CONFIG" "trainer.run_dir=$RUN_DIR" \
          ${OVERRIDES[@]+"${OVERRIDES[@]}"} "$@")
mkdir -p "$RUN_DIR"

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# 15000-29999: below Linux's ephemeral ports (32768-60999), which the node's own connections may hold.
MASTER_PORT=${MEGATRON_DAPO_PORT:-$((15000 + SLURM_JOB_ID % 15000))}
export MASTER_ADDR MASTER_PORT PROCS_PER_TASK MEGATRON_DAPO_HOME
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: ${SLURM_NTASKS} task(s) x" \
     "${PROCS_PER_TASK} rank(s), rendezvous ${MASTER_ADDR}:${MASTER_PORT}, run folder ${RUN_DIR}"

# A signal to this shell alone (Slurm's warning before the time limit, --signal=B:USR1@SECONDS, or
# `scancel --batch --signal=TERM`) asks the run to save after its current step: the STOP file reaches every node through the
# shared file system. Once the run has stopped, the job puts itself back in the queue.
STOP_REASON=
request_stop() {
    # A request of the job whose training holds the folder (RUNNING names it, and it still runs: its time-limit
    # warning) is that run's: this job's ranks refuse to train there, and replacing it would take its stop away.
    local asked other holder
    asked=$(cat "$RUN_DIR/STOP" 2>/dev/null || true)
    if [[ $asked =~ ^([0-9]+)\.[0-9]+$ ]] && [ "${BASH_REMATCH[1]}" != "$SLURM_JOB_ID" ]; then
        other=${BASH_REMATCH[1]}
        holder=$(sed -n 's/.*"slurm_job_id": *"\([0-9]*\)".*/\1/p' "$RUN_DIR/RUNNING" 2>/dev/null | head -n 1 || true)
        if [ "$holder" = "$other" ] \
           && [ -n "$(squeue -h -j "$other" -t RUNNING,COMPLETING,SUSPENDED -o %i 2>/dev/null || true)" ]; then
            echo "$(date -Is) got SIG$1: $RUN_DIR/STOP is the request of job ${other}, whose training holds the" \
                 "folder: left as it is (this job's ranks do not train there)" >&2
            return
        fi
    fi
    STOP_REASON=$1
    echo "$(date -Is) got SIG$1: asking the run to save a checkpoint and stop" >&2
    # Named for this attempt: a run whose ranks are still starting keeps it rather than take it for the last one's,
    # and another job's run in the folder (this job's ranks refuse to start there) leaves it alone. Written whole.
    echo "${SLURM_JOB_ID}.${SLURM_RESTART_COUNT:-0}" > "$RUN_DIR/.STOP.${SLURM_JOB_ID}"
    mv -f "$RUN_DIR/.STOP.${SLURM_JOB_ID}" "$RUN_DIR/STOP"
}
trap 'request_stop USR1' USR1
trap 'request_stop TERM' TERM
if [ -n "${EARLY_STOP:-}" ]; then
    request_stop "$EARLY_STOP"
fi

# srun passes --cpus-per-task on explicitly: Slurm 22.05 - 23.02 do not inherit it from sbatch.
srun --kill-on-bad-exit=1 --ntasks="$SLURM_NTASKS" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    bash examples/slurm/task.sh "$CONFIG" "trainer.run_dir=$RUN_DIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"} "$@" &
SRUN_PID=$!
while kill -0 "$SRUN_PID" 2>/dev/null; do  # `wait` returns early when a trapped signal arrives
    wait "$SRUN_PID" || true
done
wait "$SRUN_PID" && STATUS=0 || STATUS=$?  # srun's own exit status

# Whether the run is done: its newest complete checkpoint is at the total_training_steps of the config.yaml
# the last attempt started with.
finished() {
    local total latest=-1 marker n
    total=$(sed -n 's/^  total_training_steps: *\([0-9][0-9]*\) *$/\1/p' "$RUN_DIR/config.yaml" 2>/dev/null | head -n 1)
    for marker in "$RUN_DIR"/checkpoints/step_*/COMPLETE.json; do
        [ -f "$marker" ] || continue
        n=${marker%/COMPLETE.json}
        n=${n##*/step_}
        [[ $n =~ ^[0-9]+$ ]] && [ $((10#$n)) -gt "$latest" ] && latest=$((10#$n))
    done
    [ -n "$total" ] && [ "$latest" -ge "$total" ]
}

# The run clears the STOP file when it reaches its last step, and a run that has nothing left to train
# is not requeued either (a signal in the seconds it takes to shut down writes STOP again). Only a run that
# stopped cleanly (exit 0: its checkpoint saved) while the job still runs is requeued: a plain `scancel` (the
# job is CANCELLED) or the time limit (TIMEOUT) ends the job, and a run that failed on its way out (a full
# disk at the save) is not started again to fail again.
if [ -n "$STOP_REASON" ] && [ -f "$RUN_DIR/STOP" ]; then
    JOB_STATE=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' | head -n 1 || true)
    if [ "$STATUS" -eq 0 ] && finished; then
        echo "$(date -Is) the run has finished (its last checkpoint is its last step): job ${SLURM_JOB_ID} is" \
             "not requeued" >&2
        rm -f "$RUN_DIR/STOP"
    elif [ "$STATUS" -ne 0 ]; then
        echo "$(date -Is) the run failed while stopping (exit ${STATUS}): job ${SLURM_JOB_ID} is not requeued;" \
             "submit it again to continue from the last complete checkpoint" >&2
    elif [ "${JOB_STATE:-RUNNING}" != RUNNING ]; then
        echo "$(date -Is) the run stopped and saved; job ${SLURM_JOB_ID} is ${JOB_STATE} (cancelled or out of" \
             "time): not requeued" >&2
    else
        echo "$(date -Is) the run stopped and saved; requeueing job ${SLURM_JOB_ID} to continue from that checkpoint" >&2
        scontrol requeue "$SLURM_JOB_ID" || echo "requeue refused (the job is being cancelled or requeued already)" >&2
        sleep 30  # Slurm ends this script as part of the requeue
    fi
fi
exit "$STATUS"
