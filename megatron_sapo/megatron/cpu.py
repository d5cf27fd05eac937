"""CPU compatibility layer: run real megatron-core on CPU under gloo (tests, CI, laptops). Never on GPU.

megatron-core has no CPU switch; its model code is device-agnostic except for hard-coded CUDA calls.
`enable_cpu_compat()` redirects those calls to the CPU, and `cpu_transformer_config_kwargs()` gives the
TransformerConfig settings without which the CPU path cannot work (no fused kernels, fp32, CPU init).

    from megatron_sapo.megatron.cpu import enable_cpu_compat, cpu_transformer_config_kwargs
    enable_cpu_compat()                      # before building models; raises if CUDA is available
                                             # (megatron.parallel.init_parallel calls it on CPU)
    config = TransformerConfig(..., **cpu_transformer_config_kwargs())

Checked against megatron-core 0.16.1 (`CHECKED_VERSIONS`) with torch 2.14.1; other versions warn.
Tests: `python -m pytest tests/unit/test_cpu_compat_unit.py tests/distributed/test_cpu_compat.py`.

How: each megatron module listed in `_PATCHED_MODULES` gets its module-global name `torch` replaced by
`_TorchOnCpu`, a view of torch that differs in two ways only — `torch.cuda` is `_CudaOnCpu`
(current_device() -> "cpu", synchronize/empty_cache no-ops, Stream/Event/stream() null objects, RNG
calls on the CPU generator; anything else falls through to the real torch.cuda, so a site we missed
still fails loudly) and the tensor factories map `device="cuda"` to "cpu". Code outside those modules,
torch itself included, is untouched. Patched sites (megatron-core 0.16.1):

- `torch.cuda.current_device()` as a device: tensor_parallel/{layers,mappings,utils}.py (weights, TP
  gather buffers), models/common/embeddings/rotary_pos_embedding.py (RoPE inv_freq),
  transformer/{dot_product_attention,attention}.py (softmax offset, KV-cache buffers),
  transformer/moe/{router,experts}.py (router weights, expert biases), pipeline_parallel/
  p2p_communication.py (shape/recv buffers), distributed/param_and_grad_buffer.py (DDP grad buffers),
  models/gpt/gpt_model.py (inference offsets), core/utils.py (GlobalMemoryBuffer),
  dist_checkpointing/strategies/{state_dict_saver,async_utils}.py (save-failure flags).
- `device="cuda"` literals: transformer/utils.py (default / sliding-window causal mask),
  pipeline_parallel/schedules.py (`total_num_tokens`), transformer/moe/moe_utils.py (aux-loss tracker),
  core/utils.py (`local_multi_tensor_l2_norm`), distributed/param_and_grad_buffer.py (NCCL-UB warm-up).
- `torch.cuda.synchronize`: parallel_state.py (pg timeouts), p2p_communication.py,
  distributed/distributed_data_parallel.py, dist_checkpointing/{tensor_aware_state_dict,
  strategies/filesystem_async,strategies/fully_parallel,strategies/async_utils}.py (dist-ckpt save/load).
- `torch.cuda.Stream` / `current_stream` / `stream()` / Event: transformer/moe/token_dispatcher.py
  (alltoall dispatcher's device-to-host stream), transformer/moe/shared_experts.py (overlap stream),
  distributed/distributed_data_parallel.py (communication stream).
- CUDA RNG tracker, tensor_parallel/random.py: `_get_cuda_rng_state` / `_set_cuda_rng_state` read and
  write the CPU generator; `CudaRNGStatesTracker` is swapped for `_CpuRNGStatesTracker` (the original
  fork() warns on every CPU dropout because the forked stream *is* the CPU generator); the module's
  `torch.cuda.manual_seed/get_rng_state` go to the CPU generator, so `model_parallel_cuda_manual_seed`
  (called by `megatron.parallel.seed_all`) works unchanged.
- transformer/moe/moe_utils.py: `te_general_gemm` is only bound when Transformer Engine imports, yet the
  router's gating linear tests `te_general_gemm is not None` -> NameError without TE; bound to None.
- transformer/moe/token_dispatcher.py: `maybe_move_tensor_to_cpu(..., as_numpy=True)` converts only CUDA
  tensors, so on CPU the alltoall split sizes stay tensors and gloo's `all_to_all_single` rejects them
  (TypeError); the dispatcher's reference is replaced by `_split_sizes_to_numpy`.
- models/common/language_module/language_module.py: `setup_embeddings_and_output_layer` calls
  `weight.data.cuda()` before all-reducing tied embeddings across pipeline stages; wrapped so that,
  during that call only, `Tensor.cuda` returns the tensor itself.
- optimizer/{optimizer,distrib_optimizer,clip_grads,grad_scaler}.py: `device='cuda'` literals and
  `torch.cuda.current_device()` (found-inf flag, unit loss scale, multi-tensor dummy buffers, grad-norm
  all-reduce buffers, loss scalers, DP-zero state gather) go through the module view above. These
  modules also sort parameters by `param.type()` string (`'torch.cuda.FloatTensor'`, else TypeError):
  `Float16OptimizerWithFloat16Params.__init__` and `DistributedOptimizer.__init__` (which builds the
  main-param shards) and `clip_grad_by_total_norm_fp32` (an assert on every grad) are wrapped so that,
  during those calls only, a CPU tensor's `.type()` reports its CUDA type name (`_with_cuda_type_names`).
  With that, `get_megatron_optimizer` (Adam, distributed optimizer, fp32) and its grad clipping
  (`get_grad_norm_fp32` + `clip_grad_by_total_norm_fp32`, reduced over gloo) run unchanged.

- pipeline_parallel/p2p_communication.py: `batch_p2p_comm=False` (in `cpu_transformer_config_kwargs`), see
  there; the shape exchange for `variable_seq_lengths` is always batched, so interleaved schedules at PP=2
  must use one fixed micro-batch shape on CPU (`engine.PolicyEngine` does).

Not possible on CPU (not a patch gap): sequence parallelism with torch LayerNorm, hence MoE with TP>1 in
training; fused kernels; fp16/bf16 autocast paths; CUDA graphs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

CHECKED_VERSIONS = ("0.16.1",)

# Megatron modules whose global `torch` is replaced by `_TorchOnCpu` (see the module docstring for the
# sites each one holds). Relative to `megatron.core`.
_PATCHED_MODULES = (
    "utils",
    "parallel_state",
    "tensor_parallel.layers",
    "tensor_parallel.mappings",
    "tensor_parallel.utils",
    "tensor_parallel.random",
    "models.gpt.gpt_model",
    "models.common.embeddings.rotary_pos_embedding",
    "transformer.utils",
    "transformer.attention",
    "transformer.dot_product_attention",
    "transformer.moe.router",
    "transformer.moe.experts",
    "transformer.moe.moe_utils",
    "transformer.moe.token_dispatcher",
    "transformer.moe.shared_experts",
    "pipeline_parallel.p2p_communication",
    "pipeline_parallel.schedules",
    "distributed.param_and_grad_buffer",
    "distributed.distributed_data_parallel",
    "dist_checkpointing.tensor_aware_state_dict",
    "dist_checkpointing.strategies.filesystem_async",
    "dist_checkpointing.strategies.fully_parallel",
    "dist_checkpointing.strategies.state_dict_saver",
    "dist_checkpointing.strategies.async_utils",
    "optimizer.optimizer",
    "optimizer.distrib_optimizer",
    "optimizer.clip_grads",
    "optimizer.grad_scaler",
)

_enabled = False


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _factory_on_cpu(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
            kwargs.pop("pin_memory", None)  # pinning needs a CUDA driver; meaningless for a CPU target
        return fn(*args, **kwargs)

    return wrapper


class _NullEvent:
    """Stands in for torch.cuda.Event: CPU work is already complete when recorded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _NullStream:
    """Stands in for torch.cuda.Stream: CPU ops run in program order, so every wait is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _NullEvent:
        return event if event is not None else _NullEvent()

    def synchronize(self) -> None:
        pass


_DEFAULT_STREAM = _NullStream()


class _CudaOnCpu(types.ModuleType):
    """`torch.cuda` as seen by the patched megatron modules; unlisted names fall through to torch.cuda."""

    Stream = _NullStream
    Event = _NullEvent

    def __init__(self) -> None:
        super().__init__("torch.cuda (megatron_sapo CPU view)")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def synchronize(device: Any = None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def current_stream(device: Any = None) -> _NullStream:
        return _DEFAULT_STREAM

    default_stream = current_stream

    @staticmethod
    def stream(stream: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    # The device RNG *is* the CPU generator here: megatron seeds and snapshots it through these.
    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(new_state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(new_state)


class _TorchOnCpu(types.ModuleType):
    """`torch` as seen by the patched megatron modules: CUDA namespace and `device="cuda"` go to CPU."""

    def __init__(self) -> None:
        super().__init__("torch (megatron_sapo CPU view)")
        self.cuda = _CudaOnCpu()
        for name in ("empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "empty_like"):
            setattr(self, name, _factory_on_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _make_cpu_tracker_class(base: type) -> type:
    class _CpuRNGStatesTracker(base):  # type: ignore[valid-type, misc]
        """Megatron's RNG tracker on the CPU generator, without the CPU-state-changed warning."""

        @contextlib.contextmanager
        def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state, orig_name = torch.get_rng_state(), self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    return _CpuRNGStatesTracker


def _split_sizes_to_numpy(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """CPU version of moe_utils.maybe_move_tensor_to_cpu: also converts tensors already on the CPU."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy().copy()  # a copy, like the original's device-to-host transfer
    return tensor


def _identity_cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


def _with_tensor_method(name: str, replacement: Callable) -> Callable[[Callable], Callable]:
    """Decorator: run the function with `torch.Tensor.<name>` replaced, restored afterwards. Safe only
    because CUDA is absent in this process, so no real CUDA tensor can reach the replacement."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            original = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, replacement)
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(torch.Tensor, name, original)

        return wrapper

    return decorate


# `Tensor.cuda` as identity (tied-embedding setup across pipeline stages calls `.cuda()`).
_without_tensor_cuda = _with_tensor_method("cuda", _identity_cuda)


_ORIGINAL_TENSOR_TYPE = torch.Tensor.type


def _cuda_type_name(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
    if dtype is None and not kwargs and self.device.type == "cpu":
        return _ORIGINAL_TENSOR_TYPE(self).replace("torch.", "torch.cuda.", 1)  # torch.FloatTensor -> cuda
    return _ORIGINAL_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


# CPU tensors' `.type()` names the CUDA type: megatron's optimizer sorts params by that string.
_with_cuda_type_names = _with_tensor_method("type", _cuda_type_name)


def _check_version() -> None:
    from importlib.metadata import version

    found = version("megatron-core")
    if found not in CHECKED_VERSIONS:
        warnings.warn(
            f"megatron_sapo.megatron.cpu was checked against megatron-core {CHECKED_VERSIONS}, found "
            f"{found}; CUDA call sites may have moved (see this module's docstring for the list).",
            RuntimeWarning,
            stacklevel=3,
        )


def enable_cpu_compat() -> None:
    """Redirect megatron-core's hard-coded CUDA calls to the CPU. Idempotent; call before building models.

    Raises RuntimeError if CUDA is available: on a GPU these redirections would be wrong, not helpful.
    """
    global _enabled
    if torch.cuda.is_available():
        raise RuntimeError("megatron_sapo.megatron.cpu must not be enabled when CUDA is available")
    if _enabled:
        return
    _check_version()
    torch_view = _TorchOnCpu()
    for name in _PATCHED_MODULES:
        module = importlib.import_module(f"megatron.core.{name}")
        if module.__dict__.get("torch") is not torch:
            raise RuntimeError(f"megatron.core.{name} no longer binds `torch` as expected; recheck cpu.py")
        module.torch = torch_view

    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.tensor_parallel import random as mc_random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    mc_random._get_cuda_rng_state = _cpu_get_rng_state
    mc_random._set_cuda_rng_state = _cpu_set_rng_state
    mc_random.CudaRNGStatesTracker = _make_cpu_tracker_class(mc_random.CudaRNGStatesTracker)
    mc_random.initialize_rng_tracker(force_reset=True)  # drop any tracker built from the CUDA class

    if not moe_utils.HAVE_TE:
        moe_utils.te_general_gemm = None
    token_dispatcher.maybe_move_tensor_to_cpu = _split_sizes_to_numpy

    LanguageModule.setup_embeddings_and_output_layer = _without_tensor_cuda(
        LanguageModule.setup_embeddings_and_output_layer
    )

    from megatron.core.optimizer import optimizer as mc_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for cls in (mc_optimizer.Float16OptimizerWithFloat16Params, DistributedOptimizer):
        cls.__init__ = _with_cuda_type_names(cls.__init__)
    # optimizer.py imported the function by name: rebind it there (where the optimizers call it).
    mc_optimizer.clip_grad_by_total_norm_fp32 = _with_cuda_type_names(
        mc_optimizer.clip_grad_by_total_norm_fp32
    )
    _enabled = True


def is_cpu_compat_enabled() -> bool:
    """Whether `enable_cpu_compat()` has run in this process."""
    return _enabled


def cpu_transformer_config_kwargs() -> dict[str, Any]:
    """TransformerConfig kwargs required on CPU: CPU init, fp32, every fused (CUDA-only) kernel off."""
    return dict(
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,  # p2p buffers are allocated in this dtype; must match activations
        fp16=False,
        bf16=False,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        sequence_parallel=False,  # needs TE / fused LayerNorm paths not available on CPU
        # gloo pairs the p2p messages between two ranks in posting order; with PP=2 the previous and next
        # stage are the same rank, and the batched path posts send_prev before send_next on both sides, so
        # the interleaved (virtual PP) schedule's two-way exchanges swap activations and gradients. The
        # unbatched path orders even/odd ranks so that they match.
        batch_p2p_comm=False,
    )


def causal_attention_mask(seq_len: int, batch_size: int = 1) -> torch.Tensor:
    """Boolean causal mask `[B, 1, T, T]`, True where attention is *masked* (megatron's convention)."""
    mask = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)
    return mask.view(1, 1, seq_len, seq_len).expand(batch_size, 1, seq_len, seq_len)
