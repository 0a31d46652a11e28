"""How the training child is started: one process, or torchrun's data-parallel processes on one or more machines.

``accelerate launch --cpu`` starts a single process whatever ``--num_processes`` says (on CPU it fans out only
through mpirun), so several processes are started with torchrun (``python -m torch.distributed.run``), which
sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous for the Trainer: gloo on CPU, NCCL with one process per GPU
(the Trainer picks the backend from the device). One machine uses torchrun's ``--standalone`` rendezvous; several
use its static one: machine 0 (``--node-rank 0``) hosts the store at ``--rdzv-endpoint`` and its first process
is rank 0, so the machine that was told it is 0 is the one that writes the fine-tune, every time.

Nothing here imports torch: the caller is a kernel or the ``sage`` process.
"""

from __future__ import annotations

WORKER = "sage_magic.finetune.worker"
#: The variable naming the job file: every process torchrun starts reads the same job (stdin goes to one).
JOB_ENV = "SAGE_TRAIN_JOB"


def problems(processes: int, nnodes: int, node_rank: int, endpoint: str | None) -> list[str]:
    """What is wrong with the processes and machines asked for (an empty list when nothing). Plain values, as
    :func:`command` takes: train imports this module, so this one never imports train (TrainOptions)."""
    found = []
    for label, value in (("--processes", processes), ("--nnodes", nnodes)):
        if not isinstance(value, int) or value < 1:
            found.append(f"{label} must be 1 or more, not {value!r}")
    if nnodes > 1 and not endpoint:
        found.append(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT, machine 0's address and a free "
                     "port, given the same on every machine")
    if not 0 <= node_rank < max(nnodes, 1):
        found.append(f"--node-rank is this machine's number from 0 to {max(nnodes, 1) - 1}, not {node_rank}")
    if endpoint:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            found.append(f"--rdzv-endpoint takes HOST:PORT, e.g. 10.0.0.1:29400, not {endpoint!r}")
    return found


def command(python: str, processes: int, nnodes: int, node_rank: int, endpoint: str | None) -> list[str]:
    """The child's command line: the worker itself, or torchrun starting ``processes`` workers here."""
    if processes * nnodes == 1:
        return [python, "-m", WORKER]
    run = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
    if nnodes == 1:
        run.append("--standalone")
    else:
        run += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "static",
                "--rdzv-endpoint", str(endpoint)]
    return [*run, "-m", WORKER]
