"""Everything that touches megatron-core: CPU compatibility layer, vocab-parallel log-probs, model glue.

`megatron_sapo.megatron.cpu` is never imported from here: callers enable it explicitly, and only when
no CUDA device is present.
"""

import warnings


def quiet_known_warnings() -> None:
    """Filter the third-party warnings that megatron-core 0.16.1 triggers on every run and that a user can do
    nothing about, each by its exact message so that any other warning still shows. Called when this
    package is imported, and again by the CLI after an import inside `warnings.catch_warnings()` (which
    restores the filter list on exit, dropping filters added during it)."""
    # megatron's grad buffers call torch.distributed.reduce_scatter_tensor / all_gather_into_tensor, which
    # torch 2.14 deprecates (FutureWarning) in favour of *_single (param_and_grad_buffer.py).
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
    )
    # its optimizer probes `.grad` with hasattr on the fp32 main params (optimizer.py), which torch flags
    # for non-leaf tensors; the value is not used.
    warnings.filterwarnings("ignore", message=r"The \.grad attribute of a Tensor that is not a leaf Tensor")
    # TransformerConfig warns that its own default cuda_graph_scope "full" is deprecated (no CUDA graphs here).
    warnings.filterwarnings("ignore", message=r"full scope is deprecated")
    # its layer specs fall back to torch's norms without Apex: the CPU path by design, and the GPU path uses
    # Transformer Engine's fused norms.
    warnings.filterwarnings("ignore", message=r"Apex is not installed")
    warnings.filterwarnings("ignore", message=r"Transformer Engine and Apex are not installed")


quiet_known_warnings()
