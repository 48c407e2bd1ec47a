"""Several processes (GPUs, nodes): who does what.

Launched by run.sh through torchrun (or DeepSpeed's launcher with a HOSTFILE), every process runs the same job.
Rank 0 alone prepares data, writes manifests and run.json, merges, evaluates and exports; the others wait at a
barrier, train their share, and finish.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


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

    def init(self) -> None:
        """Join the process group (NCCL on GPUs, gloo on CPUs) so that barriers work before the trainer starts."""
        if self.world_size == 1:
            return
        import torch
        import torch.distributed as td

        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
        if not td.is_initialized():
            td.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as td

            if td.is_initialized():
                td.barrier()
