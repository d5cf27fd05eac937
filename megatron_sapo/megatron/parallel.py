"""The trainer's Megatron-Core parallel layout (the `parallel:` section of a run config).

Tests: tests/unit/test_config.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_sapo.utils.typed_config import check, check_min


@dataclass
class ParallelConfig:
    """Megatron-Core parallel layout of the trainer; data parallelism takes the remaining ranks."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: int | None = None
    """Virtual pipeline stages per pipeline rank (interleaved schedule); null = not interleaved."""
    ep: int = 1
    """Expert-parallel size (MoE)."""
    etp: int | None = None
    """Expert tensor-parallel size; null = same as `tp`."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1; GPU only: not possible on CPU)."""

    def __post_init__(self) -> None:
        check_min(self, "tp", "pp", "vpp", "ep", "etp")
        check(self.vpp is None or self.pp > 1, "vpp", "needs parallel.pp > 1")
        check(not self.sequence_parallel or self.tp > 1, "sequence_parallel", "needs parallel.tp > 1")
