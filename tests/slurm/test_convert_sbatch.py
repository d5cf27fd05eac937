"""examples/slurm/convert_*.sbatch on a real two-node Slurm: HF -> Megatron (EP=2, one rank per node,
`srun torchrun` with a c10d rendezvous on node1) -> HF (2 ranks), every tensor bit-exact.

Run: `python -m pytest tests/slurm/test_convert_sbatch.py -q -rs` as root (~1 min on 2 cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from megatron_sapo.utils.tiny import save_tiny_model, train_tokenizer
from tests.e2e.conftest import tiny_configs
from tests.hf_reference import load_checkpoint
from tests.slurm.cluster import LocalSlurm

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "examples" / "slurm"
# the scripts ask for 16 CPUs per task (real nodes); an emulated node has 2
SMALL = ["--nodes=2", "--cpus-per-task=1", "--time=10"]


def _tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace") if path.is_file() else f"({path} missing)"
    return "\n".join(text.splitlines()[-lines:])


def _run(cluster: LocalSlurm, script: str, log: Path, **env: str) -> None:
    common = {"MEGATRON_SAPO_HOME": str(ROOT), "VENV": sys.prefix, "NPROC_PER_NODE": "1", "NET_IF": "lo"}
    job = cluster.submit([*SMALL, str(SCRIPTS / script)], cwd=ROOT, export=common | env, output=log)
    info = cluster.wait(job, timeout=300)
    assert (info.get("JobState"), info.get("ExitCode")) == ("COMPLETED", "0:0"), (info, _tail(log))
    assert info.get("NodeList") == "node[1-2]", info


def test_convert_round_trip_across_two_nodes(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    config = tiny_configs()["moe"]  # the e2e tier's tiny Qwen3-MoE (4 experts, top-2)
    hf = save_tiny_model(tmp_path / "hf", config, train_tokenizer(vocab_size=300), seed=3)
    meg, back = tmp_path / "mcore", tmp_path / "hf_back"
    _run(slurm_cluster, "convert_hf_to_megatron.sbatch", tmp_path / "to_mcore.out",
         HF_DIR=str(hf), MEGATRON_DIR=str(meg), TP="1", PP="1", EP="2")  # fmt: skip
    _run(slurm_cluster, "convert_megatron_to_hf.sbatch", tmp_path / "to_hf.out",
         MEGATRON_DIR=str(meg), HF_DIR=str(back))  # fmt: skip
    original, converted = load_checkpoint(hf), load_checkpoint(back)
    assert sorted(converted) == sorted(original)
    for name, tensor in original.items():
        assert converted[name].dtype == tensor.dtype and torch.equal(converted[name], tensor), name
