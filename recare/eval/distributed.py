"""Which process this is when `accelerate launch` runs several, and the two calls an evaluation needs.

Evaluation is many independent (prompt, seed) images, so N processes split its batches (batch b
goes to process b mod N), each writes its own shard of images and records, and the main process
merges after a barrier. `processes(device)` reads the launcher's environment: with WORLD_SIZE > 1
it starts accelerate's `PartialState` (NCCL on GPUs, gloo on CPUs) and uses its process index,
count, device, barrier and broadcast; otherwise it is one process and nothing is imported.

    accelerate launch --multi_gpu --num_processes 4 -m recare evaluate ...             # 4 GPUs
    CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes 2 -m recare evaluate --device cpu ...

(`accelerate launch --cpu --num_processes N` starts a single process unless MPI is set up; the
`--multi_gpu` launcher on a machine without GPUs starts N CPU processes joined by gloo.)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any


@dataclasses.dataclass
class Processes:
    """This process's place among the launched ones.

    Attributes:
        index: 0 .. count - 1 (0 is the main process).
        count: how many processes share the work.
        device: the device this process should use ("auto" unless the launcher assigned one).
        state: accelerate's PartialState, or None for a single process.
    """

    index: int = 0
    count: int = 1
    device: str = "auto"
    state: Any = None

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def barrier(self) -> None:
        """Wait until every process gets here (no-op for one process)."""
        if self.state is not None:
            self.state.wait_for_everyone()

    def broadcast(self, value):
        """The main process's `value`, in every process (a picklable object)."""
        if self.state is None:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def owns(self, batch_number: int) -> bool:
        """Whether batch `batch_number` of the plan is this process's (round robin)."""
        return batch_number % self.count == self.index


def launched_world_size() -> int:
    """WORLD_SIZE as set by accelerate / torchrun (1 when unset or not a number)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def processes(device: str = "auto") -> Processes:
    """This process's `Processes`: several under `accelerate launch` (WORLD_SIZE > 1), else one.

    Args:
        device: the requested device; "cpu" (or no GPU) starts the CPU (gloo) group, "auto" takes the
            device accelerate assigns to this process (cuda:LOCAL_RANK on GPUs).
    """
    if launched_world_size() <= 1:
        return Processes(device=device)
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    chosen = str(state.device) if device == "auto" else device
    return Processes(index=state.process_index, count=state.num_processes, device=chosen, state=state)


__all__ = ["Processes", "processes", "launched_world_size"]
