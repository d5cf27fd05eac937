"""SGLang servers on other nodes than trainer rank 0's, and how the trainers find and stop them.

Disaggregated runs:

    megatron-sapo train job.yaml cluster.placement=disaggregated cluster.engine_nodes=1   # under srun

On an engine node (launch.role == "engine"), local rank 0 waits for the model the trainers prepare,
starts `cluster.engines_per_node` SGLang servers bound to the node's address on
`cluster.engine_port + i`, and keeps them up until trainer rank 0 writes the stop marker
`<run.output_dir>/engines/stop` (at the end of the run, also after an error); the node's other
processes exit at once. Trainer rank 0 derives the URLs (`launch.engine_urls`) and waits for their
/health. The engine nodes read the model and the marker from `run.output_dir`: it must be on a
filesystem every node shares (the tiny model is built by trainer rank 0 into <output_dir>/hf_init).

Colocated runs with `cluster.colocated_engines: every_node` on several nodes (`node_engines`): local rank 0
of each train node — a trainer process — starts `rollout.num_engines` servers on its node once the model
is ready and stops them when it leaves training; trainer rank 0 reaches all of them by URL.

Keys: the process that launches a node's servers generates the node's key (`EngineKey.generate`), writes
it to `<run.output_dir>/engines/keys/<node>.yaml` (mode 0600, in a mode-0700 folder, so only the job's
user reads it on the shared filesystem) before any server starts, and deletes it when they stop. Trainer
rank 0 reads it after the node's servers answer /health, so it never reads an earlier run's file. The key
is never a config value, a flag, a log line or a metric.
Tests: tests/e2e/test_multirank.py, tests/unit/test_engine_key.py (the key file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import requests

from megatron_sapo.cluster.config import ClusterConfig
from megatron_sapo.cluster.launch import Launch, every_node_engines, node_engine_ports
from megatron_sapo.rollout import RolloutError, ServerConfig, SGLangServer
from megatron_sapo.rollout.client import Endpoint
from megatron_sapo.rollout.config import RolloutConfig
from megatron_sapo.rollout.engine_key import EngineKey

log = logging.getLogger(__name__)

POLL_S = 1.0


def stop_marker(output_dir: Path) -> Path:
    """The file trainer rank 0 writes under the run's output directory to stop the engine nodes."""
    return Path(output_dir) / "engines" / "stop"


def key_file(output_dir: Path, node: str) -> Path:
    """The file holding the key of `node`'s servers (written by the process that launches them)."""
    return Path(output_dir) / "engines" / "keys" / f"{node}.yaml"


def _marker_state(path: Path) -> tuple[int, str] | None:
    try:
        return path.stat().st_mtime_ns, path.read_text()
    except OSError:
        return None


@contextlib.contextmanager
def stop_engines_at_exit(output_dir: Path, launch: Launch) -> Iterator[None]:
    """Trainer rank 0 of a disaggregated run: write the stop marker when the run ends, however it ends."""
    try:
        yield
    finally:
        if launch.engine_nodes and launch.rank == 0:
            path = stop_marker(output_dir)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".stop.{os.getpid()}.tmp")
            # new content each time: never mistaken for an old marker
            tmp.write_text(f"{uuid.uuid4().hex} {time.time()}\n")
            tmp.replace(path)


def serve_engine_node(
    launch: Launch, cluster: ClusterConfig, rollout: RolloutConfig, *, output_dir: Path, model_dir: Path
) -> int:
    """An engine node's process: local rank 0 serves `model_dir` (once trainer rank 0 has written it) until
    the stop marker under `output_dir` appears; the others exit 0."""
    if launch.local_rank != 0:
        return 0
    marker = stop_marker(output_dir)
    # a marker left by an earlier run in this output_dir is not ours: only a change of it counts
    stale = _marker_state(marker)

    def stopped() -> bool:
        state = _marker_state(marker)
        return state is not None and state != stale

    node = launch.nodes[launch.node_rank]
    model = _wait_for_model(model_dir, rollout.server.startup_timeout, stopped)
    if model is None:
        log.warning("engine node %s: the trainers stopped before the model was ready", node)
        return 0
    ports = [cluster.engine_port + i for i in range(cluster.engines_per_node)]
    servers = launch_servers(rollout, node, model, ports, output_dir=output_dir)
    try:
        for s in servers:
            s.wait_ready(s.config.startup_timeout)
        urls = [f"http://{node}:{s.port}" for s in servers]
        log.warning("engine node %s: serving %s (bound to %s)", node, " ".join(urls), servers[0].config.host)
        while not stopped():
            dead = [s.url for s in servers if not s.alive()]
            if dead:
                raise RolloutError(
                    f"engine node {node}: SGLang server(s) {dead} exited; see {servers[0].log_path}"
                )
            time.sleep(POLL_S)
    finally:
        _stop(servers, output_dir, node)
    return 0


def _wait_for_model(path: Path, timeout: float, stopped: Callable[[], bool]) -> Path | None:
    """`path` once it holds a config.json (model.path, or the tiny model trainer rank 0 writes)."""
    deadline = time.monotonic() + timeout
    while not (path / "config.json").is_file():
        if stopped():
            return None
        if time.monotonic() > deadline:
            raise RolloutError(
                f"engine node: no {path / 'config.json'} after {timeout:.0f} s (rollout.server.startup_timeout); "
                "run.output_dir must be on a filesystem shared by all nodes"
            )
        time.sleep(POLL_S)
    return path


def server_configs(base: ServerConfig, count: int, *, first_port: int | None = None) -> list[ServerConfig]:
    """`count` servers of one node: on GPUs server i takes the node's GPUs [i*tp, (i+1)*tp); with
    `first_port` server i listens on first_port + i (else each picks a free port)."""
    configs = []
    for i in range(count):
        extra = list(base.extra_args)
        if base.device == "cuda" and i:
            extra += ["--base-gpu-id", str(i * base.tp_size)]
        port = base.port if first_port is None else first_port + i
        configs.append(dataclasses.replace(base, port=port, extra_args=extra))
    return configs


def launch_servers(
    rollout: RolloutConfig, node: str, model: Path, ports: list[int], *, output_dir: Path
) -> list[SGLangServer]:
    """Start (without waiting) one SGLang server per port on this node, reachable from the other nodes,
    all locked with the node's new key (written to `key_file` first); their logs go to
    <output_dir>/logs/<node> unless `rollout.server.log_dir` is set."""
    base = rollout.server_config(str(model))
    base.host = socket.gethostbyname(node)
    if ipaddress.ip_address(base.host).is_loopback:
        # a node name mapped to 127.0.1.1 in /etc/hosts (Debian's default) would hide the servers from
        # the other nodes: listen everywhere instead
        base.host = "0.0.0.0"
    base.log_dir = base.log_dir or str(Path(output_dir) / "logs" / node)
    configs = server_configs(base, len(ports), first_port=ports[0])
    key = EngineKey.generate()
    path = key_file(output_dir, node)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    key.save(path)
    servers = [SGLangServer(c, key=key) for c in configs]
    for s in servers:  # all load in parallel
        s.launch()
    return servers


@contextlib.contextmanager
def node_engines(
    launch: Launch, cluster: ClusterConfig, rollout: RolloutConfig, *, model: Path, output_dir: Path
) -> Iterator[list[SGLangServer]]:
    """Colocated "every_node": local rank 0 of each train node runs that node's `rollout.num_engines`
    servers for the duration of the block (started here, stopped at its end however it ends); every
    other process, and every other placement, gets []."""
    if not every_node_engines(launch, cluster) or launch.local_rank != 0:
        yield []
        return
    node = launch.nodes[launch.node_rank]
    ports = node_engine_ports(cluster, launch.train_nodes.index(node), rollout.num_engines)
    servers = launch_servers(rollout, node, model, ports, output_dir=output_dir)
    try:
        yield servers
    finally:
        _stop(servers, output_dir, node)


def _stop(servers: list[SGLangServer], output_dir: Path, node: str) -> None:
    for s in servers:
        s.stop()
    key_file(output_dir, node).unlink(missing_ok=True)  # the key of stopped servers opens nothing


def remote_endpoints(urls: list[str], output_dir: Path, timeout: float) -> list[Endpoint]:
    """Trainer rank 0: the engines of other processes (http://<node>:<port>, see `launch.engine_urls`),
    once every one answers /health, each with its node's key."""
    wait_for_engines(urls, timeout)
    endpoints = []
    for url in urls:
        path = key_file(output_dir, urlsplit(url).hostname or "")
        try:
            key = EngineKey.load(path)
        except OSError as exc:
            raise RolloutError(
                f"SGLang engine {url} answers, but its key file {path} is unreadable: {exc}"
            ) from None
        endpoints.append(Endpoint(url, key))
    return endpoints


def wait_for_engines(urls: list[str], timeout: float) -> None:
    """Trainer rank 0: block until every engine answers /health; RolloutError naming the first that does not."""
    deadline = time.monotonic() + timeout
    for url in urls:
        while True:
            try:
                if requests.get(f"{url}/health", timeout=5.0).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RolloutError(
                    f"SGLang engine {url} not healthy after {timeout:.0f} s (rollout.server.startup_timeout); "
                    "see the engine node's log under <run.output_dir>/logs/<node>"
                )
            time.sleep(POLL_S)
