#!/usr/bin/env python
"""Run `phi1.train` under any MPI launcher, taking rank and world size from MPI itself (mpi4py).

    mpirun -np 16 --hostfile hosts python examples/mpi_train.py --config configs/pretrain_phi1.yaml [overrides]

MPI gives each process its rank, the world size and (from a shared-memory split of COMM_WORLD) its rank on the
node; rank 0 publishes its host name and a free port as the torch.distributed rendezvous. These become RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and the trainer then starts exactly as under torchrun. Works
with Open MPI, MPICH and Intel MPI alike (no launcher-specific environment variables are read).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def rendezvous_from_mpi() -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT as agreed over MPI."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    if world.Get_rank() == 0:
        address = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
        port = os.environ.get("MASTER_PORT")
        if port is None:
            with socket.socket() as probe:
                probe.bind(("", 0))
                port = str(probe.getsockname()[1])
        published = (address, port)
    else:
        published = None
    address, port = world.bcast(published, root=0)
    environment = {"RANK": str(world.Get_rank()), "WORLD_SIZE": str(world.Get_size()),
                   "LOCAL_RANK": str(node.Get_rank()), "MASTER_ADDR": address, "MASTER_PORT": port}
    node.Free()
    return environment


def main() -> int:
    os.environ.update(rendezvous_from_mpi())
    from phi1.train import main as train_main

    return train_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
