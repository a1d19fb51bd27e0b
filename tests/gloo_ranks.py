"""The process-group set-up of the CPU multi-rank tests' spawned workers (imported by the workers, which
conftest's ``spawn_ranks`` starts with the tests folder on ``sys.path``)."""
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init_gloo(rank: int, world: int, port: int, timeout_s: float = 60) -> None:
    """gloo over loopback, one thread per rank (two cores are shared by all ranks)."""
    os.environ.setdefault('GLOO_SOCKET_IFNAME', 'lo')
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
