"""Key plumbing without an SGLang server: which key each route gets (checked against SGLang's own route
table, read from its source), the key file, the client's headers as a plain HTTP server sees them, the
engine-node key file the trainer reads, the guard masking keys in a command's output, and admin calls
(interrupt, flush_cache) reaching every server at once.
The real server's answers are tests/e2e/test_engine_key.py.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import json
import os
import stat
import subprocess
import sys
import threading
import tokenize
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

import megatron_sapo
from megatron_sapo.cluster.engine_nodes import key_file, remote_endpoints
from megatron_sapo.rollout.client import Endpoint, SGLangEngine
from megatron_sapo.rollout.engine_key import ADMIN_ROUTES, EngineKey
from megatron_sapo.rollout.server import ORPHAN_GUARD, ServerConfig, SGLangServer
from megatron_sapo.rollout.types import RolloutError
from megatron_sapo.utils.spawn import free_port


def _sglang_route_levels() -> dict[str, str]:
    """route -> auth level ("NORMAL" or the `@auth_level(AuthLevel.X)` name) from SGLang's http_server.py."""
    spec = importlib.util.find_spec("sglang")  # locates the package without importing it (torch, ...)
    assert spec is not None and spec.submodule_search_locations, "sglang is not installed"
    source = Path(spec.submodule_search_locations[0]) / "srt" / "entrypoints" / "http_server.py"
    levels = {}
    for node in ast.walk(ast.parse(source.read_text())):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        routes, level = [], "NORMAL"
        for dec in node.decorator_list:
            if not isinstance(dec, ast.Call):
                continue
            name = ast.unparse(dec.func)
            if name.split(".")[-1] in ("get", "post", "put", "api_route") and dec.args:
                if isinstance(dec.args[0], ast.Constant):
                    routes.append(dec.args[0].value)
            elif name == "auth_level":
                level = ast.unparse(dec.args[0]).split(".")[-1]
        for route in routes:
            levels[route] = level
    return levels


def _routes_the_package_calls(known: set[str]) -> set[str]:
    """String literals under megatron_sapo/ that are SGLang routes."""
    found = set()
    for path in Path(megatron_sapo.__file__).parent.rglob("*.py"):
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type == tokenize.STRING:
                try:
                    value = ast.literal_eval(tok.string)
                except (ValueError, SyntaxError):
                    continue
                if isinstance(value, str) and value in known:
                    found.add(value)
    return found


def test_admin_routes_are_exactly_the_admin_routes_the_package_calls() -> None:
    levels = _sglang_route_levels()
    assert levels["/generate"] == "NORMAL" and levels["/update_weights_from_disk"] == "ADMIN_OPTIONAL"
    called = _routes_the_package_calls(set(levels))
    assert {"/generate", "/model_info", "/flush_cache", "/update_weights_from_tensor"} <= called
    assert {r for r in called if levels[r] == "ADMIN_OPTIONAL"} == ADMIN_ROUTES


def test_each_route_gets_its_key() -> None:
    key = EngineKey(api="a" * 8, admin="b" * 8)
    assert key.headers("/generate") == {"Authorization": "Bearer aaaaaaaa"}
    assert key.headers("/update_weights_from_disk") == {"Authorization": "Bearer bbbbbbbb"}
    assert key.for_route("/flush_cache?x=1") == "bbbbbbbb"
    # a server started with --api-key only accepts the api key on its admin routes too
    assert EngineKey(api="a" * 8).for_route("/flush_cache") == "aaaaaaaa"
    assert EngineKey().headers("/generate") == {} and EngineKey().strings() == []


def test_generated_keys_are_fresh_and_never_printed() -> None:
    first, second = EngineKey.generate(), EngineKey.generate()
    assert len({first.api, first.admin, second.api, second.admin}) == 4
    assert len(first.api) == 64  # 32 random bytes in hex
    assert first.api not in repr(first) and first.admin not in f"{first}"


_PARSE_KEY_FILES = """
import json, sys
from sglang.srt.server_args import prepare_server_args
out = []
for path in sys.argv[1:]:
    try:
        args = prepare_server_args(["--model-path", "unused", "--config", path])
        out.append([args.api_key, args.admin_api_key])
    except SystemExit:
        out.append(None)
print(json.dumps(out))
"""


def test_sglang_reads_every_generated_key_file(tmp_path: Path) -> None:
    """SGLang turns the `--config` file back into flags: a key read as a flag (one starting with "-", as
    1 in 32 urlsafe keys did) made the server exit at start. Its own parser (in a child process: importing
    sglang pulls in IPython, which needs a stdin) must give every generated key back."""
    keys = [EngineKey(api="-starts-with-a-dash", admin="x")] + [EngineKey.generate() for _ in range(200)]
    paths = [str(key.save(tmp_path / f"k{i}.yaml")) for i, key in enumerate(keys)]
    done = subprocess.run(
        [sys.executable, "-c", _PARSE_KEY_FILES, *paths],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    parsed = json.loads(done.stdout.strip().splitlines()[-1])
    assert parsed[0] is None  # the failure this guards against, shown on SGLang's parser
    assert parsed[1:] == [[key.api, key.admin] for key in keys[1:]]


def test_keys_from_the_environment() -> None:
    env = {"MEGATRON_SAPO_ENGINE_API_KEY": "k1", "MEGATRON_SAPO_ENGINE_ADMIN_KEY": "k2"}
    assert EngineKey.from_env(env) == EngineKey(api="k1", admin="k2")
    assert EngineKey.from_env({"MEGATRON_SAPO_ENGINE_API_KEY": "k1"}).for_route("/flush_cache") == "k1"
    assert EngineKey.from_env({}) == EngineKey()


def test_key_file_is_private_and_in_sglang_flag_names(tmp_path: Path) -> None:
    key = EngineKey.generate()
    path = key.save(tmp_path / "keys.yaml")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert yaml.safe_load(path.read_text()) == {"api-key": key.api, "admin-api-key": key.admin}
    assert EngineKey.load(path) == key
    key.save(path)  # replaced in place, no temporary file left
    assert [p.name for p in tmp_path.iterdir()] == ["keys.yaml"]


def test_server_command_names_the_key_file_not_the_keys(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 8}))
    server = SGLangServer(ServerConfig(model_path=str(tmp_path), log_dir=str(tmp_path)))
    other = SGLangServer(ServerConfig(model_path=str(tmp_path), log_dir=str(tmp_path)))
    assert server.key != other.key  # one fresh key per launched server
    command = " ".join(server.command(tmp_path / "k.yaml"))
    assert f"--config {tmp_path / 'k.yaml'}" in command
    assert server.key.api not in command and server.key.admin not in command
    assert "--api-key" not in command
    assert Endpoint(server).key == server.key
    with pytest.raises(ValueError, match="own key"):
        Endpoint(server, EngineKey.generate())


class _Recorder(BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, str | None]]] = []

    def _answer(self) -> None:
        self.seen.append((self.path, self.headers.get("Authorization")))
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = json.dumps({"model_path": "m", "weight_version": "7"}).encode()
        status = 401 if self.path == "/locked" else 200
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder():
    _Recorder.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, _Recorder.seen
    httpd.shutdown()


def test_engine_nodes_key_reaches_every_request(recorder, tmp_path: Path) -> None:
    """An engine node's key file -> the trainer's endpoints -> the Authorization header on the wire."""
    httpd, seen = recorder
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    key = EngineKey.generate()
    key_file(tmp_path, "127.0.0.1").parent.mkdir(parents=True)
    key.save(key_file(tmp_path, "127.0.0.1"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"vocab_size": 8}))
    endpoints = remote_endpoints([url], tmp_path, timeout=30)
    engine = SGLangEngine(endpoints, model_path=str(tmp_path / "model"))
    assert engine.weight_version == "7"
    engine.flush_cache()
    assert seen[0] == ("/health", None)  # SGLang never locks /health: waited for before the key is read
    assert seen[1:] == [("/model_info", f"Bearer {key.api}"), ("/flush_cache", f"Bearer {key.admin}")]
    with pytest.raises(RolloutError, match=r"refused the request \(401\).*MEGATRON_SAPO_ENGINE_API_KEY"):
        engine.request(engine.endpoints[0], "GET", "/locked")


def test_an_engine_without_its_key_file_is_a_clear_error(recorder, tmp_path: Path) -> None:
    httpd, _ = recorder
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    with pytest.raises(RolloutError, match=r"key file .*127\.0\.0\.1\.yaml"):
        remote_endpoints([url], tmp_path, timeout=30)


def test_guard_masks_the_keys_it_reads_and_the_command_cannot_read_them() -> None:
    child = (
        "import sys; print('api=SECRET1 admin=SECRET2 other'); "
        "print('stdin:', repr(sys.stdin.read()), file=sys.stderr)"
    )
    out = subprocess.run(
        [sys.executable, str(ORPHAN_GUARD), str(os.getpid()), "--", sys.executable, "-c", child],
        input=b"SECRET1\nSECRET2",
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 0, out
    lines = out.stdout.decode().splitlines()
    assert "api=*** admin=*** other" in lines
    assert "stdin: ''" in lines  # the child's stderr goes through the guard too; its stdin is empty
    assert b"SECRET" not in out.stdout + out.stderr


def test_rollout_urls_send_the_key_from_the_environment(
    recorder, tmp_path: Path, monkeypatch, caplog
) -> None:
    from megatron_sapo.cluster.launch import resolve
    from megatron_sapo.train.config import TrainJobConfig
    from megatron_sapo.train.engines import build_engine
    from megatron_sapo.utils.typed_config import from_dict

    httpd, seen = recorder
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 8}))
    cfg = from_dict(TrainJobConfig, {"rollout": {"urls": [url]}, "run": {"output_dir": str(tmp_path)}})
    launch = resolve({}, cfg.cluster, cfg.parallel)
    monkeypatch.setenv("MEGATRON_SAPO_ENGINE_API_KEY", "user-api")
    monkeypatch.setenv("MEGATRON_SAPO_ENGINE_ADMIN_KEY", "user-admin")
    engine = build_engine(cfg, tmp_path, tmp_path, launch)
    engine.flush_cache()
    assert engine.weight_version == "7"
    assert seen == [("/flush_cache", "Bearer user-admin"), ("/model_info", "Bearer user-api")]
    monkeypatch.delenv("MEGATRON_SAPO_ENGINE_API_KEY")
    monkeypatch.delenv("MEGATRON_SAPO_ENGINE_ADMIN_KEY")
    with caplog.at_level("WARNING"):
        build_engine(cfg, tmp_path, tmp_path, launch).flush_cache()
    assert seen[-1] == ("/flush_cache", None) and "MEGATRON_SAPO_ENGINE_API_KEY is not set" in caplog.text


class _Held(BaseHTTPRequestHandler):
    """Answers an admin POST only once the other server has been reached (or 10 s have passed)."""

    other_reached: ClassVar[threading.Event] = threading.Event()
    saw_other: ClassVar[list[bool]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.saw_other.append(self.other_reached.wait(10))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def test_admin_calls_reach_every_server_at_once(recorder, tmp_path: Path) -> None:
    """interrupt / flush_cache go to all servers concurrently: a server that holds its answer (the first
    one here) does not keep the next from being reached; a dead one is logged by interrupt (its generate
    handles it) and raised, naming its URL, by flush_cache, after the others were reached."""
    httpd, seen = recorder
    held = ThreadingHTTPServer(("127.0.0.1", 0), _Held)
    threading.Thread(target=held.serve_forever, daemon=True).start()
    dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    urls = [f"http://127.0.0.1:{a.server_address[1]}" for a in (held, httpd)] + [dead_url]
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 8}))
    engine = SGLangEngine(urls, model_path=str(tmp_path), max_retries=0)
    _Held.saw_other, _Held.other_reached = [], threading.Event()

    class Mark(_Recorder):  # the recorder's server sets the event when it is reached
        def _answer(self) -> None:
            _Held.other_reached.set()
            super()._answer()

        do_POST = _answer

    httpd.RequestHandlerClass = Mark
    try:
        engine.interrupt()
        assert _Held.saw_other == [True] and seen == [("/abort_request", None)]
        _Held.other_reached.clear()
        with pytest.raises(RolloutError, match=rf"SGLang {dead_url}/flush_cache"):
            engine.flush_cache()
        assert _Held.saw_other == [True, True] and seen[-1] == ("/flush_cache", None)
    finally:
        held.shutdown()
