"""The SGLang rollout engine against a real CPU SGLang server: log-probs, sampling, finish, bad input.

References are independent of the engine: transformers' teacher-forced forward of the same checkpoint.
Run: `python -m pytest tests/e2e/test_sglang_engine.py -q` (starts two tiny servers, and one more for the
port-race and orphan test, ~2.5 min).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import signal
import subprocess
import sys
import time

import pytest
import requests
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from megatron_sapo.rollout.sglang_updates import SGLangWeightUpdater
from megatron_sapo.rollout.types import RolloutError, SamplingParams

PROMPTS = ["1 + 2 =", [5, 6, 7, 8, 9, 10, 11], "the answer is what 12"]


def teacher_forced(model_dir, gens, temperature: float) -> list[torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for g in gens:
            ids = torch.tensor([g.prompt_ids + g.token_ids])
            logits = model(ids).logits[0, len(g.prompt_ids) - 1 : -1].float()
            logp = torch.log_softmax(logits / temperature, dim=-1)
            out.append(logp.gather(-1, torch.tensor(g.token_ids)[:, None])[:, 0])
    return out


@pytest.mark.parametrize("name", ["dense", "moe"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_transformers(name, temperature, reset_weights, tiny_models) -> None:
    engine = reset_weights(name)
    gens = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=temperature, seed=3), n=2)
    assert [(g.prompt_index, g.sample_index) for g in gens] == [(p, s) for p in range(3) for s in range(2)]
    assert all(g.weight_version == "orig" and len(g.token_ids) == len(g.logprobs) > 0 for g in gens)
    assert gens[2].prompt_ids == list(PROMPTS[1])
    ref = teacher_forced(tiny_models[name], gens, temperature)
    diff = torch.cat([(torch.tensor(g.logprobs) - r).abs() for g, r in zip(gens, ref)])
    # fp32 engine on CPU: far inside bf16 tolerance (~1e-2); measured ~1e-6
    assert diff.max().item() < 1e-4, diff.max().item()


def test_n_samples_differ_and_chunks_keep_order(reset_weights, monkeypatch) -> None:
    engine = reset_weights("dense")
    sent = []  # samples per /generate request (the real requests, observed)
    request = engine.request

    def observed(endpoint, method, path, payload=None, **kw):
        if path == "/generate":
            sent.append(len(payload["input_ids"]))
        return request(endpoint, method, path, payload, **kw)

    monkeypatch.setattr(engine, "request", observed)
    monkeypatch.setattr(engine, "request_batch", 3)  # 2 prompts x 4 samples -> 3 concurrent requests
    gens = engine.generate(["1 + 2 =", [9, 8, 7]], SamplingParams(max_new_tokens=10), n=4)
    assert sorted(sent) == [2, 3, 3]
    assert [(g.prompt_index, g.sample_index) for g in gens] == [(p, s) for p in range(2) for s in range(4)]
    assert all(g.prompt_ids == [9, 8, 7] for g in gens[4:])
    assert len({tuple(g.token_ids) for g in gens[:4]}) > 1  # the n samples of one prompt differ
    # the default request_batch: one server, one request for all 8 samples
    default = inspect.signature(type(engine).__init__).parameters["request_batch"].default
    monkeypatch.setattr(engine, "request_batch", default)
    sent.clear()
    again = engine.generate(["1 + 2 =", [9, 8, 7]], SamplingParams(max_new_tokens=10), n=4)
    assert sent == [8]
    assert [(g.prompt_index, g.sample_index) for g in again] == [(p, s) for p in range(2) for s in range(4)]


def test_finish_reasons(reset_weights) -> None:
    engine = reset_weights("dense")
    (g,) = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3, temperature=0.0))
    assert g.finish_reason == "length" and len(g.token_ids) == 3
    first = g.token_ids[0]
    (s,) = engine.generate(
        [[5, 6, 7]], SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=[first])
    )
    assert s.finish_reason == "stop" and s.token_ids == [first]  # the stop token is part of the response


@pytest.mark.parametrize("bad", [[-1, 5], [5, 320], []])
def test_bad_token_ids_rejected_server_healthy(bad, reset_weights, sglang_servers) -> None:
    engine = reset_weights("dense")
    with pytest.raises(RolloutError, match="prompt 1"):
        engine.generate([[5, 6], bad], SamplingParams(max_new_tokens=2))
    assert sglang_servers["dense"].healthy()
    assert len(engine.generate([[5, 6]], SamplingParams(max_new_tokens=2))[0].token_ids) == 2


def _moe_case(tiny_models, case: str) -> list[tuple[str, torch.Tensor]]:
    state = load_file(tiny_models["moe"] / "model.safetensors")
    gate = "model.layers.0.mlp.experts.0.gate_proj.weight"
    if case == "unknown name":
        return [("model.layers.0.mlp.no_such.weight", state[gate])]
    if case == "wrong shape":
        return [(gate, state[gate][:-1])]
    # transformers-5 in-memory fused name: SGLang would answer "success" and change nothing
    fused = torch.cat([state[gate], state[gate.replace("gate_proj", "up_proj")]])[None]
    return [("model.layers.0.mlp.experts.gate_up_proj", fused)]


@pytest.mark.parametrize("case", ["unknown name", "wrong shape", "fused expert name"])
def test_bad_sync_rejected_weights_unchanged(case, reset_weights, sglang_servers, tiny_models) -> None:
    engine = reset_weights("moe")
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    before = engine.generate([[5, 6, 7]], params)[0]
    updater = SGLangWeightUpdater(engine)
    updater.begin()
    with pytest.raises(RolloutError, match="rejected before sending"):
        updater.load_tensors(_moe_case(tiny_models, case))
    updater.end()
    assert sglang_servers["moe"].healthy()
    after = engine.generate([[5, 6, 7]], params)[0]
    assert after.token_ids == before.token_ids  # greedy
    # equal up to prefix-cache numerics (a cached prompt is not recomputed): ~1e-6; a weight change is >1e-2
    assert max(abs(a - b) for a, b in zip(after.logprobs, before.logprobs)) < 1e-5
    assert after.weight_version == "orig"


def test_sync_outside_begin_end_is_a_clear_error(reset_weights, tiny_models) -> None:
    engine = reset_weights("dense")
    state = load_file(tiny_models["dense"] / "model.safetensors")
    with pytest.raises(RolloutError, match="begin_weight_update"):
        SGLangWeightUpdater(engine).load_tensors([("model.norm.weight", state["model.norm.weight"])])


def test_memory_release_is_refused_on_cpu(reset_weights) -> None:
    engine = reset_weights("dense")
    with pytest.raises(RolloutError, match="GPU-only"):
        engine.release_memory()
    with pytest.raises(RolloutError, match="GPU-only"):
        engine.resume_memory()


LAUNCHER = """
import sys, time
import requests
from megatron_sapo.rollout.server import ServerConfig, SGLangServer
server = SGLangServer(ServerConfig(model_path=sys.argv[1], log_dir=sys.argv[2]))
server.port = int(sys.argv[3])  # taken by another server: the race, made certain
server.start()
info = requests.get(f"{server.url}/model_info", headers=server.key.headers("/model_info"), timeout=5).json()
print(server.port, server._proc.pid, info["model_path"], flush=True)
time.sleep(900)
"""


def test_a_server_relaunches_off_a_taken_port_and_ends_with_its_launcher(
    sglang_servers, tiny_models, tmp_path
) -> None:
    """One launched server, two lifecycle faults (one start-up instead of two):
    - the free port a server picks can be taken before SGLang binds it (start-up is slow on a busy
      machine). Here the port is the dense test server's, which answers /health: it must not be taken for
      ours (it serves another model), and ours relaunches on a new port once its bind failed;
    - a trainer SIGKILLed (no stop()) must not leave its SGLang server holding the port (and GPU memory):
      the server's group leader notices its parent is gone and ends the group."""
    taken = sglang_servers["dense"].port
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(tiny_models["moe"]), str(tmp_path), str(taken)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    group = None
    try:
        port, group, served = launcher.stdout.readline().split()
        port, group = int(port), int(group)
        assert port != taken and served == str(tiny_models["moe"])
        assert "address already in use" in next(tmp_path.glob("sglang-*.log")).read_text()
        assert sglang_servers["dense"].healthy()  # the other server was left alone
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the SGLang server's process group outlived its launcher by 60 s")
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
        log = next(tmp_path.glob("sglang-*.log")).read_text()
        assert f"process {launcher.pid} that started this server is gone" in log
    finally:
        for pgid in (group, launcher.pid):
            if pgid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
