"""Several processes (GPUs, nodes): who does what, and how long one waits for another.

Launched by run.sh through torchrun (or DeepSpeed's launcher with a HOSTFILE), every process runs the same job.
Rank 0 alone prepares data, writes manifests and run.json, merges, evaluates and exports; the others wait at a
barrier, train their share, and finish.

Two waits, two bounds. A collective inside training (the gradient all-reduce, the checkpoint barrier, the stop
vote) takes seconds unless a process is hung: it fails after DIST_TIMEOUT_MINUTES, and torchrun then stops the
others, so a hung rank ends the job with an error instead of hanging it. Waiting for rank 0's solo stages (data
preparation, replay generation: hours on a large set) is not a hang: it has its own bound, MAIN_WAIT.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

MAIN_WAIT = timedelta(hours=24)  # the other ranks wait this long for rank 0's preparation
_main_wait_group = None          # a gloo group with that timeout, made in init() (a group is per process state)


@dataclass(frozen=True)
class Dist:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "Dist":
        """The launcher (torchrun, DeepSpeed) sets these per process: they say which process this is, not how to
        train, so they are read here rather than carried in the RunConfig (which every rank shares)."""
        return cls(int(environ.get("WORLD_SIZE", 1)), int(environ.get("RANK", 0)), int(environ.get("LOCAL_RANK", 0)))

    def init(self, timeout_minutes: float = 30.0) -> None:
        """Join the process group (NCCL on GPUs, gloo on CPUs) so that barriers work before the trainer starts.

        The group's timeout bounds every collective: transformers, accelerate and DeepSpeed find the group
        initialised and keep it (and its timeout)."""
        global _main_wait_group
        if self.world_size == 1:
            return
        import torch
        import torch.distributed as td

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(self.local_rank)
        if not td.is_initialized():
            td.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
        if _main_wait_group is None:
            _main_wait_group = td.new_group(backend="gloo", timeout=MAIN_WAIT)

    def wait_for_main(self) -> None:
        """Every rank waits here until rank 0 has finished what it does alone (bounded by MAIN_WAIT, not by the
        collectives' timeout)."""
        if self.world_size > 1:
            import torch.distributed as td

            if td.is_initialized():
                td.barrier(group=_main_wait_group)


def agree_on_stop(signum: int) -> int:
    """The stop vote, at the end of every step of a multi-process run: the largest signal number any process
    received (0: none). A signal reaches one node's processes only (or reaches the processes of one node a moment
    apart): without the vote one rank would stop and save while another starts the next step, and both would
    wait for each other until the timeout."""
    import torch
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()) or td.get_world_size() == 1:
        return signum
    device = torch.device("cuda", torch.cuda.current_device()) if td.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([signum], dtype=torch.int32, device=device)
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return int(t.item())
