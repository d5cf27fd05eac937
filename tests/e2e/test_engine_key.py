"""Locked engines against a real CPU SGLang server launched through `SGLangServer`.

Without its key (or with the wrong one of the two) every route this package uses is refused with SGLang's
401 and changes nothing: the served weights (a greedy generation's log-probs) and the weight version stay
as they were, also after a refused weight update that names another checkpoint. With the key
`SGLangEngine` generates and updates weights (from disk, from tensors), matching transformers on the new
checkpoint. The keys appear neither in the server's log (SGLang prints its arguments there: masked) nor
in `ps`, nor in the environment of the server's processes, and the key file is gone once it is ready.
Run: `python -m pytest tests/e2e/test_engine_key.py -q` (one tiny server, ~1 min on 2 cores).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest
import requests
import torch
from safetensors.torch import load_file, save_file

from megatron_sapo.rollout.client import Endpoint, SGLangEngine
from megatron_sapo.rollout.engine_key import EngineKey
from megatron_sapo.rollout.server import ServerConfig, SGLangServer
from megatron_sapo.rollout.sglang_updates import SGLangWeightUpdater
from megatron_sapo.rollout.types import RolloutError, SamplingParams
from tests.e2e.test_sglang_engine import teacher_forced

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)
PROMPT = [5, 6, 7, 8]
UNAUTHORIZED = {"error": "Unauthorized"}


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    logs = tmp_path_factory.mktemp("locked_logs")
    with SGLangServer(ServerConfig(model_path=str(tiny_models["dense"]), log_dir=str(logs))) as s:
        yield s


@pytest.fixture(scope="module")
def other_checkpoint(tiny_models, tmp_path_factory) -> Path:
    """The dense model with every weight moved: what a refused update would have loaded."""
    out = tmp_path_factory.mktemp("other") / "dense"
    shutil.copytree(tiny_models["dense"], out)
    state = load_file(out / "model.safetensors")
    g = torch.Generator().manual_seed(7)
    save_file(
        {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in state.items()},
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
    return out


def _refused_requests(other: Path) -> list[tuple[str, str, dict | None]]:
    """(method, route, payload): every route this package calls, with payloads that would change the
    server (or, on CPU, crash it: release_memory_occupation) if they got through."""
    return [
        ("GET", "/model_info", None),
        ("GET", "/server_info", None),
        ("POST", "/generate", {"input_ids": [PROMPT], "sampling_params": [{"max_new_tokens": 2}]}),
        ("POST", "/update_weights_from_disk", {"model_path": str(other), "weight_version": "stolen"}),
        ("POST", "/begin_weight_update", {}),
        ("POST", "/update_weights_from_tensor", {"serialized_named_tensors": ["x"], "flush_cache": True}),
        ("POST", "/end_weight_update", {}),
        (
            "POST",
            "/init_weights_update_group",
            {
                "master_address": "127.0.0.1",
                "master_port": 1,
                "rank_offset": 1,
                "world_size": 2,
                "group_name": "stolen",
                "backend": "gloo",
            },
        ),
        (
            "POST",
            "/update_weights_from_distributed",
            {
                "names": ["lm_head.weight"],
                "dtypes": ["float32"],
                "shapes": [[320, 64]],
                "group_name": "stolen",
            },
        ),
        ("POST", "/destroy_weights_update_group", {"group_name": "stolen"}),
        ("POST", "/update_weight_version", {"new_version": "stolen", "abort_all_requests": True}),
        ("POST", "/flush_cache", None),
        ("POST", "/release_memory_occupation", {"tags": ["weights", "kv_cache"]}),
        ("POST", "/resume_memory_occupation", {"tags": ["weights", "kv_cache"]}),
    ]


def _state(engine: SGLangEngine):
    gen = engine.generate([PROMPT], GREEDY)[0]
    return engine.weight_version, gen.token_ids, gen.logprobs


def test_requests_without_the_key_are_refused_and_change_nothing(server, other_checkpoint) -> None:
    engine = SGLangEngine([server])
    version, tokens, logprobs = _state(engine)
    wrong = EngineKey.generate()
    refused = 0
    for method, route, payload in _refused_requests(other_checkpoint):
        admin = server.key.for_route(route) == server.key.admin
        tries = {
            "none": {},
            "wrong": wrong.headers(route),
            # the other key of this server: the api key on an admin route, the admin key elsewhere
            "other": {"Authorization": f"Bearer {server.key.api if admin else server.key.admin}"},
        }
        for name, headers in tries.items():
            r = requests.request(method, server.url + route, json=payload, headers=headers, timeout=30)
            # at once: a request that got through may wedge the server (a group that never forms)
            assert (r.status_code, r.json()) == (401, UNAUTHORIZED), (route, name, r.status_code, r.text)
            refused += 1
    assert refused == 3 * 14
    assert server.alive() and server.healthy()
    after_version, after_tokens, after_logprobs = _state(engine)
    assert after_version == version
    assert after_tokens == tokens
    # equal up to prefix-cache numerics (~1e-6); the refused disk update would have moved them by >1e-2
    assert max(abs(a - b) for a, b in zip(after_logprobs, logprobs, strict=True)) < 1e-5


def test_with_the_key_the_engine_generates_and_updates(server, tiny_models, other_checkpoint) -> None:
    engine = SGLangEngine([Endpoint(server.url, server.key)], model_path=str(tiny_models["dense"]))
    version, _, before = _state(engine)
    updater = SGLangWeightUpdater(engine)
    try:
        updater.load_disk(other_checkpoint, version="other")
        gen = engine.generate([PROMPT], GREEDY)[0]
        assert gen.weight_version == "other" and engine.weight_version == "other"
        (ref,) = teacher_forced(other_checkpoint, [gen], 1.0)
        assert (torch.tensor(gen.logprobs) - ref).abs().max().item() < 1e-4
        # tensor transport: begin / update_weights_from_tensor / end / update_weight_version / flush_cache
        norm = load_file(tiny_models["dense"] / "model.safetensors")["model.norm.weight"]
        updater.begin()
        updater.load_tensors([("model.norm.weight", norm * 3.0)])
        updater.end()
        updater.finish("tensor")
        gen = engine.generate([PROMPT], GREEDY)[0]
        assert gen.weight_version == "tensor"
    finally:
        updater.load_disk(tiny_models["dense"], version=version)
    _, _, restored = _state(engine)
    assert max(abs(a - b) for a, b in zip(restored, before, strict=True)) < 1e-5
    # a client holding no key (a bare URL) is refused, with the hint where keys come from
    with pytest.raises(RolloutError, match=r"refused the request \(401\)"):
        SGLangEngine([server.url], model_path=str(tiny_models["dense"])).generate([PROMPT], GREEDY)


def test_the_keys_are_not_in_the_log_ps_or_the_environment(server) -> None:
    keys = server.key.strings()
    assert len(keys) == 2
    log = server.log_path.read_text()
    # SGLang printed its arguments, keys included: the guard masked them
    assert "'api_key': '***'" in log and "'admin_api_key': '***'" in log
    assert not [k for k in keys if k in log]
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    assert "sglang.launch_server" in ps and not [k for k in keys if k in ps]
    # the keys reached SGLang through a file, removed once the server was ready
    key_files = re.findall(r"--config (\S+)", log)
    assert key_files and not [f for f in key_files if Path(f).exists()]
    procs = psutil.Process(server._proc.pid).children(recursive=True)
    assert any("scheduler" in p.name() for p in procs)
    for p in procs:
        environ = Path(f"/proc/{p.pid}/environ").read_bytes()
        assert not [k for k in keys if k.encode() in environ], p.name()
