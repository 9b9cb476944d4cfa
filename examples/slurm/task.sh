# One srun task: torchrun with PROCS_PER_TASK ranks, joined to the others through the first node.
# Run by examples/slurm/launch.sh (which exports MASTER_ADDR, MASTER_PORT, PROCS_PER_TASK); arguments:
# the config and its overrides.
set -euo pipefail

# gloo and NCCL must talk over an interface the other nodes can reach: the one that routes to the first
# node, and on the first node the one that holds its address. MEGATRON_DAPO_IFNAME overrides the choice.
# Without `ip` or a resolvable first node, gloo and NCCL choose for themselves.
if [ -z "${MEGATRON_DAPO_IFNAME:-}" ] && command -v ip >/dev/null; then
    master_ip=$(getent ahostsv4 "$MASTER_ADDR" | awk 'NR == 1 {print $1}' || true)
    if [ -n "$master_ip" ]; then
        MEGATRON_DAPO_IFNAME=$(ip -o route get "$master_ip" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p' || true)
        if [ "$MEGATRON_DAPO_IFNAME" = lo ] && [ "${SLURM_NNODES:-1}" -gt 1 ]; then
            MEGATRON_DAPO_IFNAME=$(ip -o -4 addr show | awk -v ip="$master_ip" '{split($4, a, "/")} a[1] == ip {print $2; exit}' || true)
            if { [ -z "$MEGATRON_DAPO_IFNAME" ] || [ "$MEGATRON_DAPO_IFNAME" = lo ]; } && command -v scontrol >/dev/null; then
                # The first node's name resolves to a loopback address here (127.0.1.1 in Debian's /etc/hosts):
                # the interface that routes to another node of the job is the one the others can reach.
                # This node by its Slurm name (which may differ from its host name) and its host names.
                other=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null \
                        | grep -vx -e "${SLURMD_NODENAME:-$MASTER_ADDR}" -e "$(hostname 2>/dev/null || true)" \
                                   -e "$(hostname -s 2>/dev/null || true)" | head -n 1 || true)
                other_ip=$( [ -n "$other" ] && getent ahostsv4 "$other" | awk 'NR == 1 {print $1}' || true)
                MEGATRON_DAPO_IFNAME=$( [ -n "$other_ip" ] && ip -o route get "$other_ip" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p' || true)
            fi
            if [ -z "$MEGATRON_DAPO_IFNAME" ] || [ "$MEGATRON_DAPO_IFNAME" = lo ]; then
                echo "task ${SLURM_PROCID} on $(hostname): no network interface reaches the other nodes;" \
                     "set MEGATRON_DAPO_IFNAME" >&2
                MEGATRON_DAPO_IFNAME=
            fi
        fi
    fi
fi
if [ -n "${MEGATRON_DAPO_IFNAME:-}" ]; then
    echo "task ${SLURM_PROCID} on $(hostname): gloo / NCCL over ${MEGATRON_DAPO_IFNAME}" >&2
    export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$MEGATRON_DAPO_IFNAME}
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$MEGATRON_DAPO_IFNAME}
fi

# megatron-core's tensor-parallel layers (without Transformer Engine) overlap their collectives with the
# gradient matmuls only when each GPU runs kernels in the order they were launched; Megatron-LM's launchers set
# this too. The SGLang engine's own processes are started without it (megatron_dapo/rollout/sglang/engine.py).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

exec torchrun --nnodes="$SLURM_NTASKS" --node-rank="$SLURM_PROCID" --nproc-per-node="$PROCS_PER_TASK" \
    --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" -m megatron_dapo train "$@"
