"""Pure-torch `rotary_embedding` with the signature of `vllm._custom_ops.rotary_embedding`.

SGLang 0.5.23 imports this function when its rotary layer is built on a non-CUDA device
(sglang/srt/layers/rotary_embedding/base.py); without it the CPU server cannot start. Only the CPU
server's PYTHONPATH carries this directory (`rollout/server.py`); GPU servers never see it.

    rotary_embedding(positions [T], query [T, H*D], key [T, Hk*D] | None, head_size D,
                     cos_sin_cache [max_pos, R] (cos | sin halves), is_neox) -> None  (in place)

Only the first R channels of each head rotate (partial rotary); is_neox rotates the two halves of
those channels (Llama/Qwen), otherwise interleaved pairs (GPT-J). Checked against transformers'
`apply_rotary_pos_emb` in tests/unit/test_rotary_shim.py.
"""

import torch


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor | None,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox: bool,
) -> None:
    pos = positions.reshape(-1)
    rot = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache.index_select(0, pos).chunk(2, dim=-1)  # [T, R/2] each
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    for x in (query, key):
        if x is None:
            continue
        # reshape, not view: query/key may be strided column slices of a fused qkv tensor.
        heads = x.reshape(pos.shape[0], -1, head_size)
        part = heads[..., :rot].float()
        c, s = cos.float(), sin.float()
        if is_neox:
            x1, x2 = part[..., : rot // 2], part[..., rot // 2 :]
            out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        else:
            x1, x2 = part[..., 0::2], part[..., 1::2]
            out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
        heads[..., :rot] = out.to(x.dtype)
        if heads.data_ptr() != x.data_ptr():  # reshape had to copy
            x.copy_(heads.reshape(x.shape))
