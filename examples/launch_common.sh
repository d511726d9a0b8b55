#!/usr/bin/env bash
# Shared by the example launchers (sourced, not run): start `python -m phi1.train --config CONFIG ARGS...` on
# this node's GPUs, whatever started us.
#   - under torchrun (`torchrun ... examples/X.sh`, with or without --no-python) or mpirun, RANK / OMPI_COMM_WORLD_RANK is set:
#     this process is one rank, so run the trainer directly;
#   - otherwise (`bash examples/X.sh`) start torchrun with GPUS_PER_NODE processes on this node, and for
#     NNODES > 1 a c10d rendezvous at MASTER_ADDR:MASTER_PORT (run the same command on every node).
# Environment: GPUS_PER_NODE (default: the GPUs nvidia-smi lists, else 1), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), RUN_ID (phi1), PYTHON (python).

phi1_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$phi1_repo${PYTHONPATH:+:$PYTHONPATH}"

phi1_gpu_count() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || echo 1
    else
        echo 1
    fi
}

# Overrides from the environment, for launchers that serve any config (multi-node, SLURM): only those set.
phi1_env_overrides() {
    phi1_env_args=()
    [[ -n "${DATA_PATH:-}" ]] && phi1_env_args+=("data.path=$DATA_PATH")
    [[ -n "${TOKENIZER_MODEL:-}" ]] && phi1_env_args+=("data.tokenizer_model=$TOKENIZER_MODEL")
    [[ -n "${CHECKPOINT_DIR:-}" ]] && phi1_env_args+=("checkpoint.dir=$CHECKPOINT_DIR")
    [[ -n "${INIT_FROM:-}" ]] && phi1_env_args+=("finetune.init_from=$INIT_FROM")
    [[ -n "${EXERCISES:-}" ]] && phi1_env_args+=("finetune.data=$EXERCISES")
    return 0
}

# True when a launcher (torchrun, mpirun, PMI) started this process as one rank.
phi1_launched_rank() {
    [[ -n "${RANK:-}" || -n "${OMPI_COMM_WORLD_RANK:-}" || -n "${PMI_RANK:-}" ]]
}

phi1_launch() {
    local config="$1"
    shift
    [[ "$config" == /* ]] || config="$phi1_repo/$config"
    local python="${PYTHON:-python}"
    if phi1_launched_rank; then
        exec "$python" -m phi1.train --config "$config" "$@"
    fi
    local nnodes="${NNODES:-1}" nproc="${GPUS_PER_NODE:-$(phi1_gpu_count)}"
    local rendezvous=(--standalone)
    if [[ "$nnodes" != 1 ]]; then
        rendezvous=(--nnodes "$nnodes" --node-rank "${NODE_RANK:-0}" --rdzv-backend c10d
                    --rdzv-endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" --rdzv-id "${RUN_ID:-phi1}")
    fi
    echo "launching $nnodes node(s) x $nproc process(es): $config $*" >&2
    exec "$python" -m torch.distributed.run "${rendezvous[@]}" --nproc-per-node "$nproc" \
        -m phi1.train --config "$config" "$@"
}
