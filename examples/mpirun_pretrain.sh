#!/usr/bin/env bash
# phi-1 pretraining launched by mpirun; ranks and world size come from MPI (examples/mpi_train.py, mpi4py).
#   NP=8 HOSTFILE=hosts CONFIG=configs/pretrain_phi1.yaml bash examples/mpirun_pretrain.sh [overrides...]
# As root Open MPI also needs OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; MPIRUN_ARGS adds
# launcher flags (e.g. "--oversubscribe" on a machine with fewer cores than ranks).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
hostfile=()
[[ -n "${HOSTFILE:-}" ]] && hostfile=(--hostfile "$HOSTFILE")
# shellcheck disable=SC2086
exec mpirun -np "${NP:-8}" "${hostfile[@]}" ${MPIRUN_ARGS:-} -x PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" \
    -x OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" \
    "${PYTHON:-python}" "$repo/examples/mpi_train.py" --config "$repo/${CONFIG:-configs/pretrain_phi1.yaml}" \
    data.path="${DATA_PATH:-data/codetextbook_text_document}" \
    data.tokenizer_model="${TOKENIZER_MODEL:-data/codegen-350M-mono}" \
    checkpoint.dir="${CHECKPOINT_DIR:-checkpoints/phi1-base}" \
    "$@"
