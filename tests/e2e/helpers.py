"""Helpers the e2e tests share: start SGLang servers together, the converter CLIs' launcher, live-tensor bytes."""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Iterator

import torch

from megatron_sapo.rollout.server import SGLangServer
from megatron_sapo.utils.spawn import free_port


@contextlib.contextmanager
def running(servers: dict[str, SGLangServer]) -> Iterator[dict[str, SGLangServer]]:
    """Launch every server at once (they load in parallel), wait for each, stop them all on exit."""
    try:
        for server in servers.values():
            server.launch()
        for server in servers.values():
            server.wait_ready(server.config.startup_timeout)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def launcher(nproc: int = 1) -> list[str]:
    """The python (or torchrun, for `nproc` > 1 ranks on a free port) command a converter script runs under."""
    command = [sys.executable]
    if nproc > 1:
        command += [
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}",
        ]
    return command


class LiveStorages:
    """Bytes of the tensor storages seen by `track` that are still alive (weakref-finalized), so a test
    can bound what a streaming converter holds at once."""

    def __init__(self) -> None:
        self.alive: dict[int, int] = {}

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if id(storage) not in self.alive:
            self.alive[id(storage)] = storage.nbytes()
            weakref.finalize(storage, self.alive.pop, id(storage))
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self.alive.values())
