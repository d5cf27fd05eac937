"""megatron/parallel.py: the one layout validator, and `model.dtype` / `parallel.sequence_parallel` /
`parallel.etp` reaching megatron (or a one-line LayoutError where this machine cannot honour them).

On GPU the values are shown by building the trainer's TransformerConfig with `on_gpu` patched to True
(no CUDA call is made); on CPU by the built model and the parallel state of a 1-rank gloo group. etp
below tp needs 2 ranks: tests/distributed/test_parallel_etp.py.

    python -m pytest tests/unit/test_parallel.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_sapo.cli import main
from megatron_sapo.megatron import models, parallel
from megatron_sapo.megatron.parallel import LayoutError, ParallelConfig, check_layout
from megatron_sapo.train import setup
from megatron_sapo.train.config import TrainJobConfig
from megatron_sapo.utils.spawn import free_port
from megatron_sapo.utils.typed_config import from_dict
from tests.hf_reference import qwen3_config, qwen3_moe_config

if torch.cuda.is_available():
    pytest.skip("the CPU-side checks need a machine without CUDA", allow_module_level=True)


def _cfg(**sections: dict) -> TrainJobConfig:
    return from_dict(TrainJobConfig, sections)


def _layout_error(**kwargs) -> str:
    with pytest.raises(LayoutError) as info:
        check_layout(**kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend to be on a GPU: the device choice of parallel.py (and its copy in models.py)."""
    monkeypatch.setattr(parallel, "on_gpu", lambda: True)
    monkeypatch.setattr(models, "on_gpu", lambda: True)


# ---- the validator --------------------------------------------------------------------------------
def test_layout_errors_name_the_setting() -> None:
    moe = qwen3_moe_config()  # 4 heads, 2 KV heads, 3 layers, 4 experts, moe width 32
    msg = _layout_error(parallel=ParallelConfig(tp=4), hf_config=moe)
    assert "parallel.tp=4" in msg and "num_key_value_heads=2" in msg
    msg = _layout_error(parallel=ParallelConfig(pp=2), hf_config=moe)
    assert "parallel.pp" in msg and "num_hidden_layers=3" in msg
    msg = _layout_error(parallel=ParallelConfig(ep=3), hf_config=moe)
    assert "parallel.ep=3" in msg and "num_experts=4" in msg
    msg = _layout_error(parallel=ParallelConfig(ep=2), hf_config=qwen3_config())
    assert "parallel.ep=2" in msg and "no experts" in msg
    msg = _layout_error(parallel=ParallelConfig(tp=2, etp=3), hf_config=moe, gpu=True)
    assert "parallel.etp=3" in msg and "moe_intermediate_size=32" in msg
    msg = _layout_error(parallel=ParallelConfig(tp=2, etp=1, ep=4), world=2)
    assert "parallel.etp x parallel.ep = 1 x 4 = 4" in msg and "2 ranks of one pipeline stage" in msg
    check_layout(ParallelConfig(tp=2, etp=1, ep=2), world=4, hf_config=moe, gpu=True)  # fits
    # the converters name their flags
    msg = _layout_error(parallel=ParallelConfig(tp=4), hf_config=moe, prefix="--")
    assert msg.startswith("--tp=4 ")


def test_vlm_layouts_split_the_text_tower_and_keep_deepstack_on_the_first_stage() -> None:
    """A Qwen3-VL config is checked through its text_config (4 heads, 2 KV heads, 6 layers); its 3
    deepstack layers must all fall in the first (virtual) pipeline stage, next to the vision tower."""
    from megatron_sapo.utils.tiny_vlm import tiny_vlm_config

    vlm = tiny_vlm_config(moe=True, num_layers=6)
    msg = _layout_error(parallel=ParallelConfig(tp=4), hf_config=vlm)
    assert "parallel.tp=4" in msg and "num_key_value_heads=2" in msg
    msg = _layout_error(parallel=ParallelConfig(pp=3), hf_config=vlm, prefix="--")
    assert (
        msg.startswith("--pp=3 puts 2 of num_hidden_layers=6 on the first pipeline stage")
        and "3 deepstack" in msg
    )
    twelve = tiny_vlm_config(num_layers=12)
    msg = _layout_error(parallel=ParallelConfig(pp=3, vpp=2), hf_config=twelve)
    assert "parallel.pp x parallel.vpp = 3 x 2 puts 2 of" in msg
    check_layout(ParallelConfig(pp=2, ep=2), world=4, hf_config=vlm)  # layers 0-2 on stage 0
    check_layout(ParallelConfig(pp=2, vpp=2), world=2, hf_config=twelve)  # 3 per virtual stage


def test_cpu_refuses_bfloat16_and_sequence_parallelism() -> None:
    msg = _layout_error(parallel=ParallelConfig(), dtype="bfloat16", gpu=False)
    assert msg.startswith("model.dtype 'bfloat16' needs a GPU")
    msg = _layout_error(parallel=ParallelConfig(tp=2, sequence_parallel=True), gpu=False)
    assert msg.startswith("parallel.sequence_parallel needs a GPU")
    check_layout(ParallelConfig(tp=2, sequence_parallel=True), dtype="bfloat16", gpu=True)  # fine on GPU


def test_gpu_moe_with_tp_needs_sequence_parallelism() -> None:
    layout = ParallelConfig(tp=2, sequence_parallel=False)
    msg = _layout_error(parallel=layout, hf_config=qwen3_moe_config(), gpu=True)
    assert msg.startswith("parallel.sequence_parallel false with parallel.tp=2 on a MoE model")
    check_layout(layout, hf_config=qwen3_config(), gpu=True)  # dense: sequence parallelism is optional
    check_layout(ParallelConfig(tp=2), hf_config=qwen3_moe_config(), gpu=True)  # null: on


# ---- the keys reach megatron ----------------------------------------------------------------------
def test_gpu_transformer_config_takes_dtype_sequence_parallel_and_etp(gpu: None) -> None:
    cfg = _cfg(model={"dtype": "bfloat16"}, parallel={"tp": 2, "ep": 2, "etp": 1, "sequence_parallel": True})
    config = setup.model_config(cfg, qwen3_moe_config())
    assert config.params_dtype == torch.bfloat16 and config.bf16 and config.pipeline_dtype == torch.bfloat16
    assert config.sequence_parallel
    sizes = (config.tensor_model_parallel_size, config.expert_model_parallel_size)
    assert sizes == (2, 2) and config.expert_tensor_parallel_size == 1
    # before: bf16 and sequence_parallel = tp > 1 whatever the config said
    cfg = _cfg(model={"dtype": "float32"}, parallel={"tp": 2, "sequence_parallel": False})
    config = setup.model_config(cfg, qwen3_config())
    assert config.params_dtype == torch.float32 and not config.bf16 and not config.sequence_parallel
    config = setup.model_config(_cfg(parallel={"tp": 2}), qwen3_config())
    assert config.sequence_parallel  # null: on with tp > 1 on a GPU
    cfg = _cfg(parallel={"tp": 2, "sequence_parallel": False})
    with pytest.raises(LayoutError, match=r"^parallel\.sequence_parallel false"):
        setup.model_config(cfg, qwen3_moe_config())


def test_cpu_model_and_parallel_state_follow_the_config() -> None:
    from megatron.core import parallel_state

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        cfg = _cfg(parallel={"etp": 1})
        parallel.init_parallel(cfg.parallel, seed=3)
        assert parallel_state.get_expert_tensor_parallel_world_size() == 1
        hf_config = qwen3_moe_config()
        model = models.build_gpt_model(hf_config, config=setup.model_config(cfg, hf_config))
        assert model.config.expert_tensor_parallel_size == 1 and not model.config.sequence_parallel
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


# ---- the errors come first, as one line through the CLI (exit 2) ----------------------------------
@pytest.mark.parametrize(
    ("override", "key"),
    [
        (["model.dtype=bfloat16"], "model.dtype"),
        (["parallel.tp=2", "parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
    ],
)
def test_cpu_cannot_honour_is_one_cli_line_before_any_work(
    override: list[str], key: str, tmp_path, capsys: pytest.CaptureFixture
) -> None:
    quickstart = str(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml")
    assert main(["train", quickstart, f"run.output_dir={tmp_path}", *override]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"megatron-sapo train: error: {key}"), errors
    assert not dist.is_initialized() and not (tmp_path / "hf_init").exists()
