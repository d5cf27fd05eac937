"""Run one SGLang server as a subprocess: launch, wait for health, log to a file, stop, restart.

    server = SGLangServer(ServerConfig(model_path="hf_dir", device="cpu", log_dir="out/logs"))
    server.start()                     # blocks until /health answers (or raises with the log tail)
    server.url                         # http://127.0.0.1:<free port>
    server.key                         # its EngineKey: requests without it get 401
    server.restart()                   # same flags, same port; used by the client when it died
    server.stop()                      # SIGTERM to the whole process group, SIGKILL after a grace

CPU servers get SGLang's CPU flags (torch-native attention and sampling, no CUDA graphs, fp32, a bounded
KV pool — else it is sized from host RAM and the scheduler is OOM-killed) and the rotary-kernel
stand-in on their PYTHONPATH (`cpu_shim/`); GPU servers get neither. See ../shared/DESIGN.md.
Every server runs with SGLang's image-embedding cache off (`SGLANG_VLM_CACHE_SIZE_MB=0`): it would
serve embeddings of the vision weights before a sync (tests/e2e/test_vlm_sglang.py shows both sides).
Each server runs under `orphan_guard.py`, the leader of its process group, which ends the group when the
process that launched it dies without `stop()` (SIGKILL, OOM kill): no server keeps its port and GPU memory
after its trainer is gone.
Every server is locked (`engine_key.py`): a fresh random api + admin key unless one is given (an engine
node's servers share the node's key). SGLang takes keys as flags only, so they reach it in a mode-0600
YAML file passed as `--config` (expanded inside the server: `ps` shows the path, not the keys), deleted
once the server is ready; the guard (told them through its stdin) masks them in the server's log, where
SGLang prints its arguments.
Tests: tests/e2e/test_sglang_engine.py, tests/e2e/test_engine_key.py, tests/e2e/conftest.py,
tests/e2e/test_vlm_sglang.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from megatron_sapo.rollout.engine_key import EngineKey
from megatron_sapo.rollout.types import RolloutError
from megatron_sapo.utils.spawn import free_port

log = logging.getLogger(__name__)

CPU_SHIM_DIR = Path(__file__).resolve().parent / "cpu_shim"
ORPHAN_GUARD = Path(__file__).resolve().parent / "orphan_guard.py"
DEVICES = ("cpu", "cuda")


@dataclass
class ServerConfig:
    """How to launch one SGLang server."""

    model_path: str
    """Hugging Face directory (config, tokenizer, safetensors) the server loads at start."""
    device: str = "cpu"
    """"cpu" or "cuda"; picks the flag set and whether the CPU rotary stand-in is used."""
    host: str = "127.0.0.1"
    """Address to bind; a node's own address for multi-node runs."""
    port: int = 0
    """Port to bind; 0 picks a free one at the first start (kept across restarts)."""
    tp_size: int = 1
    """SGLang tensor parallelism (GPUs per engine)."""
    dtype: str = "auto"
    """Weights/activations dtype; "auto" means float32 on CPU (log-prob parity) and bfloat16 on GPU."""
    max_total_tokens: int | None = None
    """KV-cache pool size in tokens; None means 16384 on CPU and SGLang's own sizing on GPU."""
    mem_fraction_static: float | None = None
    """GPU memory fraction for weights + KV cache (GPU only; colocated runs lower it)."""
    weight_version: str = "0"
    """Weight version the server reports before the first sync."""
    startup_timeout: float = 300.0
    """Seconds to wait for /health after launch before giving up with the log tail."""
    log_dir: str | None = None
    """Directory for the server log (server-<port>.log); None means a temp directory."""
    extra_args: list[str] = field(default_factory=list)
    """Further `sglang.launch_server` flags, passed through verbatim."""

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"ServerConfig.device must be one of {DEVICES}, got {self.device!r}")
        if not (Path(self.model_path) / "config.json").is_file():
            raise ValueError(f"ServerConfig.model_path: no config.json in {self.model_path!r}")


class SGLangServer:
    """One `python -m sglang.launch_server` process and its log."""

    def __init__(self, config: ServerConfig, *, key: EngineKey | None = None) -> None:
        """`key`: the keys that lock the server; None = fresh random ones."""
        self.config = config
        self.key = key or EngineKey.generate()
        self.model_path = config.model_path
        self.weight_version = config.weight_version
        self.port = config.port or free_port()
        log_dir = Path(config.log_dir) if config.log_dir else Path(_tempdir())
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"sglang-{self.port}.log"
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._key_dir: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def command(self, key_file: str | Path) -> list[str]:
        """The launch command; `key_file` is the YAML holding the keys (`EngineKey.save`)."""
        c = self.config
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", self.model_path]
        cmd += ["--config", str(key_file)]
        cmd += ["--host", c.host, "--port", str(self.port), "--tp-size", str(c.tp_size)]
        cmd += ["--weight-version", self.weight_version, "--skip-server-warmup"]
        if c.device == "cpu":
            cmd += ["--device", "cpu", "--attention-backend", "torch_native"]
            cmd += ["--sampling-backend", "pytorch", "--disable-cuda-graph"]
            # The overlap scheduler only pays with a GPU; on 2 CPU cores it triples decode time.
            cmd += ["--disable-overlap-schedule"]
            # An idle scheduler busy-polls one core; on a 2-core machine that starves the trainer.
            cmd += ["--sleep-on-idle"]
            cmd += ["--dtype", "float32" if c.dtype == "auto" else c.dtype]
            cmd += ["--max-total-tokens", str(c.max_total_tokens or 16384)]
        else:
            cmd += ["--dtype", "bfloat16" if c.dtype == "auto" else c.dtype]
            if c.max_total_tokens:
                cmd += ["--max-total-tokens", str(c.max_total_tokens)]
            if c.mem_fraction_static is not None:
                cmd += ["--mem-fraction-static", str(c.mem_fraction_static)]
        return cmd + list(c.extra_args)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # SGLang keeps vision-encoder outputs in a cache keyed by the image's content; neither a weight
        # update nor /flush_cache empties it, so after a sync an image seen before keeps its old-weight
        # embedding (measured: log-probs off by ~0.1, no error). Forced on every server, user setting
        # or not: only multimodal models read it, and a policy's weights change at every step.
        env["SGLANG_VLM_CACHE_SIZE_MB"] = "0"
        if self.config.device == "cpu":
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CPU_SHIM_DIR), env.get("PYTHONPATH")]))
            env.setdefault("SGLANG_USE_CPU_ENGINE", "0")
        return env

    def start(self) -> None:
        """Launch and wait until /health answers; raises RolloutError with the log tail on failure."""
        self.launch()
        self.wait_ready(self.config.startup_timeout)

    def launch(self) -> None:
        """Start the process without waiting (launch several, then `wait_ready` each: they load in parallel)."""
        if self.alive():
            return
        log.info("starting SGLang on %s (log %s)", self.url, self.log_path)
        self._drop_key_file()
        self._key_dir = tempfile.mkdtemp(prefix="sglang-key-")  # mode 0700
        command = self.command(self.key.save(Path(self._key_dir) / "keys.yaml"))
        with open(self.log_path, "ab") as fh:
            fh.write(f"\n==== start {time.strftime('%F %T')}: {' '.join(command)}\n".encode())
            fh.flush()
            # the guard leads the server's process group and ends it if this process dies without stop()
            guard = [sys.executable, str(ORPHAN_GUARD), str(os.getpid()), "--"]
            self._proc = subprocess.Popen(
                guard + command,
                stdin=subprocess.PIPE,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,
            )
        # the strings the guard masks in the log: through a pipe, not argv or the environment
        with contextlib.suppress(BrokenPipeError), self._proc.stdin as pipe:  # a dead guard: see wait_ready
            pipe.write("\n".join(self.key.strings()).encode())

    def wait_ready(self, timeout: float) -> None:
        """Wait for /health of *this* server (the model it reports is ours). A free port picked at
        construction can be taken by another process before SGLang binds it (start-up takes 20 s to
        minutes on a loaded machine): then it relaunches on a new free port, up to 3 times."""
        try:
            self._wait_ready(timeout)
        finally:
            self._drop_key_file()  # read at start-up; a restart writes it again

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        port_retries = 0
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                if not self.config.port and port_retries < 3 and self._port_was_taken():
                    port_retries += 1
                    old, self.port = self.port, free_port()
                    log.warning(
                        "SGLang: port %d was taken before the server bound it; relaunching on %d",
                        old,
                        self.port,
                    )
                    self._proc = None
                    self.launch()
                    continue
                raise RolloutError(
                    f"SGLang server {self.url} exited with code {self._proc.returncode} during start-up; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if self.healthy(timeout=2.0) and self._serves_our_model():
                log.info("SGLang on %s is ready", self.url)
                return
            time.sleep(0.5)
        self.stop()
        raise RolloutError(
            f"SGLang server {self.url} not healthy after {timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}"
        )

    def _port_was_taken(self) -> bool:
        """Whether the last start-up failed to bind its port (SGLang logs it, then shuts down)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return False
        return "address already in use" in text[text.rfind("==== start") :]

    def _serves_our_model(self) -> bool:
        """Whether the server answering on our port loaded our model (not another process's server)."""
        try:
            info = requests.get(
                f"{self.url}/model_info", headers=self.key.headers("/model_info"), timeout=5.0
            ).json()
        except (requests.RequestException, ValueError):
            return False
        return info.get("model_path") == self.model_path

    def healthy(self, timeout: float = 5.0) -> bool:
        try:
            # SGLang answers /health without a key; sent anyway, should a version lock it
            response = requests.get(
                f"{self.url}/health", headers=self.key.headers("/health"), timeout=timeout
            )
            return response.status_code == 200
        except requests.RequestException:
            return False

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the server's process group (scheduler and detokenizer too), SIGKILL after `grace`."""
        proc, self._proc = self._proc, None
        self._drop_key_file()
        if proc is None or proc.poll() is not None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()

    def kill(self) -> None:
        """SIGKILL the whole server process group at once (a crash, for tests)."""
        if self._proc is not None and self._proc.poll() is None:
            _signal_group(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def restart(self) -> None:
        """Stop whatever is left and start again with the same flags, model path and weight version."""
        self.stop(grace=5.0)
        self.restarts += 1
        log.warning("restarting SGLang on %s (restart #%d)", self.url, self.restarts)
        self.start()

    def _drop_key_file(self) -> None:
        if self._key_dir is not None:
            shutil.rmtree(self._key_dir, ignore_errors=True)
            self._key_dir = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> SGLangServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _tempdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="sglang-logs-")
