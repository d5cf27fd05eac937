"""The SGLang rollout engine: one client over one or more SGLang servers (round-robin).

    engine = SGLangEngine([SGLangServer(cfg)])          # or [Endpoint("http://node3:30000", key), ...]
    gens = engine.generate(["1 + 2 ="], SamplingParams(max_new_tokens=8), n=4)
    gens[0].token_ids, gens[0].logprobs, gens[0].finish_reason, gens[0].weight_version

Requests carry token ids (strings are tokenized here, with the served model's tokenizer) in as few
chunks as the servers and `request_batch` (the most samples one request carries) allow, evenly sized: one
request per server when each server's share fits (a server batches what one request brings together; the
same samples as 8 requests of 16 took 4x longer on a loaded CPU server, benchmarks/RESULTS.md); at
most `max_concurrency` chunks (never fewer than the servers) are in flight (back-pressure), each to the
next server in turn. A chunk that fails because its server died is retried after the server is restarted
(servers this client launched) and the `on_restart` hooks ran — weight sync registers one that pushes the
current weights again, so a restarted server never serves stale weights. With `retry_after_restart=False`
such a request raises `EngineRestarted` after the restart instead (multi-rank trainers: the weights can only
be pushed collectively, so the caller re-syncs and redoes the work); `generate` then cancels its pending
chunks. Token ids are validated against the vocabulary before sending: SGLang's scheduler dies on an
out-of-range id. `interrupt()` (another thread) aborts every request in flight: each returns its tokens
and log-probs so far, finish_reason "abort" (partial rollouts, `train/pipeline.py`).

Every request carries its server's key (`engine_key.py`: the api key, or the admin key on weight,
cache and memory routes): a launched server's own, or the key given with an `Endpoint`'s URL (a plain
URL string sends none).

Weight updates (called by `rollout/weight_sync.py`, which owns the trainer side) live in
`rollout/sglang_updates.py`. Tests: tests/e2e/test_sglang_engine.py, tests/e2e/test_engine_key.py,
tests/unit/test_vlm_client.py (a VLM config.json).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests

from megatron_sapo.data.images import to_data_uri
from megatron_sapo.data.vision import ImagePrompt
from megatron_sapo.rollout.engine_key import ADMIN_KEY_ENV, API_KEY_ENV, EngineKey
from megatron_sapo.rollout.server import SGLangServer
from megatron_sapo.rollout.types import Generation, Prompt, RolloutError, SamplingParams, prompt_budgets

log = logging.getLogger(__name__)

RESTARTABLE = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class EngineRestarted(RolloutError):
    """A request's server died and was restarted (healthy again, with its initial weights); not retried."""


class Endpoint:
    """One server URL, its key and, when this process launched it, the server to restart."""

    def __init__(self, target: SGLangServer | str, key: EngineKey | None = None) -> None:
        """`key`: of a server given by URL (None: it has none); a launched server brings its own."""
        if isinstance(target, SGLangServer):
            if key is not None:
                raise ValueError("Endpoint: a launched server brings its own key")
            self.server, self.url, self.key = target, target.url, target.key
        else:
            self.server, self.url, self.key = None, target.rstrip("/"), key or EngineKey()
        self.lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Endpoint({self.url})"


class SGLangEngine:
    """`RolloutEngine` over SGLang HTTP servers."""

    def __init__(
        self,
        targets: Sequence[SGLangServer | Endpoint | str],
        *,
        model_path: str | None = None,
        max_concurrency: int = 8,
        request_batch: int = 256,
        request_timeout: float = 900.0,
        max_retries: int = 2,
        retry_after_restart: bool = True,
    ) -> None:
        """`targets`: servers launched here (restartable), or running ones as an `Endpoint` (URL and key)
        or a bare URL (no key). `retry_after_restart`:
        False makes a request whose server had to be restarted raise `EngineRestarted` (after the restart
        and the `on_restart` hooks) instead of retrying it on the restarted server."""
        if not targets:
            raise ValueError("SGLangEngine needs at least one server or URL")
        self.endpoints = [t if isinstance(t, Endpoint) else Endpoint(t) for t in targets]
        self.model_path = model_path or self._served_model_path()
        self.max_concurrency = max_concurrency
        self.request_batch = request_batch
        self.request_timeout = request_timeout
        self.max_retries = max_retries
        self.retry_after_restart = retry_after_restart
        self.on_restart: list[Callable[[Endpoint], None]] = []
        self.vocab_size, self.top_k = _model_sizes(self.model_path)
        self._tokenizer: Any = None
        self._next = 0
        self._next_lock = threading.Lock()
        self._interrupted = threading.Event()

    # ---- plumbing -------------------------------------------------------------------------------
    def _served_model_path(self) -> str:
        server = self.endpoints[0].server
        if server is not None:
            return server.model_path
        return self.request(self.endpoints[0], "GET", "/model_info")["model_path"]

    @property
    def weight_version(self) -> str:
        return str(self.request(self.endpoints[0], "GET", "/model_info")["weight_version"])

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return self._tokenizer

    def request(
        self,
        endpoint: Endpoint,
        method: str,
        path: str,
        payload: dict | None = None,
        *,
        retry: bool = True,
        timeout: float | None = None,
    ) -> Any:
        """One HTTP call (`timeout`: seconds, default `request_timeout`); a dead launched server is
        restarted (hooks run) and the call retried (or `EngineRestarted` raised, see
        `retry_after_restart`)."""
        attempts = self.max_retries + 1 if retry else 1
        for attempt in range(attempts):
            restarts = endpoint.server.restarts if endpoint.server is not None else 0
            try:
                response = requests.request(
                    method,
                    endpoint.url + path,
                    json=payload,
                    headers=endpoint.key.headers(path),
                    timeout=timeout or self.request_timeout,
                )
            except RESTARTABLE as exc:
                if attempt + 1 == attempts or not self.recover(endpoint):
                    raise RolloutError(f"SGLang {endpoint.url}{path}: {exc}") from exc
                self._restarted_since(endpoint, restarts, path)
                continue
            if response.status_code >= 500 and attempt + 1 < attempts and self.recover(endpoint):
                self._restarted_since(endpoint, restarts, path)
                continue
            if response.status_code in (401, 403):
                raise RolloutError(
                    f"SGLang {endpoint.url}{path} refused the request ({response.status_code}): wrong or "
                    f"missing key; servers given by URL take {API_KEY_ENV} / {ADMIN_KEY_ENV}"
                )
            if response.status_code != 200:
                raise RolloutError(
                    f"SGLang {endpoint.url}{path} answered {response.status_code}: {response.text[:500]}"
                )
            if not response.content:
                return None
            if response.headers.get("content-type", "").startswith("application/json"):
                return response.json()
            return response.text  # e.g. /flush_cache answers in plain text
        raise AssertionError("unreachable")

    def recover(self, endpoint: Endpoint) -> bool:
        """Restart a launched server that is down; True when it is (again) healthy."""
        if endpoint.server is None:
            return False
        with endpoint.lock:
            if endpoint.server.healthy(timeout=5.0):
                return True  # another thread restarted it already
            endpoint.server.restart()
            for hook in self.on_restart:
                hook(endpoint)
        return True

    def _restarted_since(self, endpoint: Endpoint, restarts: int, path: str) -> None:
        """Raise `EngineRestarted` when retries after a restart are off and the server restarted (here or
        in another thread) since the request was sent."""
        if not self.retry_after_restart and endpoint.server.restarts != restarts:
            raise EngineRestarted(
                f"SGLang {endpoint.url} died during {path} and was restarted with its initial weights; "
                "the request was not retried"
            )

    def _pick(self) -> Endpoint:
        with self._next_lock:
            endpoint = self.endpoints[self._next % len(self.endpoints)]
            self._next += 1
        return endpoint

    # ---- generation -----------------------------------------------------------------------------
    def encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Token ids per prompt; strings through the tokenizer, id lists validated (an `ImagePrompt`'s: the
        processor's expansion)."""
        out = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, ImagePrompt):
                ids = list(prompt.input_ids)
            else:
                ids = self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
            if not ids:
                raise RolloutError(f"prompt {i} is empty")
            bad = [t for t in ids if not isinstance(t, (int, np.integer)) or not 0 <= t < self.vocab_size]
            if bad:
                raise RolloutError(
                    f"prompt {i}: token ids {bad[:5]} are not in [0, {self.vocab_size}) (vocab of {self.model_path})"
                )
            out.append([int(t) for t in ids])
        return out

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingParams,
        *,
        n: int = 1,
        return_routed_experts: bool = False,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        """n samples per prompt, ordered by (prompt_index, sample_index); `max_new_tokens`: one budget per
        prompt instead of `sampling.max_new_tokens`. `interrupt` (another thread) ends it early."""
        self._interrupted.clear()
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        prompt_budgets(len(prompts), sampling, max_new_tokens)  # validated before anything is sent
        ids = self.encode(prompts)
        images = _image_payloads(prompts)
        items = [(p, s) for p in range(len(ids)) for s in range(n)]
        count = max(min(len(self.endpoints), len(items)), -(-len(items) // self.request_batch))
        size = -(-len(items) // count)
        chunks = [items[i : i + size] for i in range(0, len(items), size)]

        def run(chunk: list[tuple[int, int]]) -> list[Generation]:
            if self._interrupted.is_set():  # interrupted before it was sent: nothing generated
                return [Generation(p, s, ids[p], [], [], "abort", "") for p, s in chunk]
            return self._generate_chunk(chunk, ids, sampling, return_routed_experts, images, max_new_tokens)

        workers = min(max(self.max_concurrency, len(self.endpoints)), len(chunks))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(run, chunk) for chunk in chunks]
            try:
                results = [f.result() for f in futures]
            except BaseException:
                for f in futures:  # the call fails anyway: don't send the chunks still waiting
                    f.cancel()
                raise
        return [g for chunk in results for g in chunk]

    def _generate_chunk(
        self,
        chunk: list[tuple[int, int]],
        ids: list[list[int]],
        sampling: SamplingParams,
        return_routed_experts: bool,
        images: list[tuple[str, list[str]]] | None = None,
        budgets: Sequence[int] | None = None,
    ) -> list[Generation]:
        """One /generate request for `chunk` ((prompt, sample) pairs). Image prompts (`images`: each
        prompt's chat-template text and data URIs) go as text + image_data, SGLang expanding the vision
        placeholders itself; its prompt length must equal our processor's expansion (`ids`), or the
        trainer would score other tokens than the engine sampled from."""
        params = []
        for p, s in chunk:
            sp = sampling.to_sglang()
            if sampling.seed is not None:  # distinct samples of one prompt need distinct seeds
                sp["sampling_seed"] = sampling.seed + p * 1_000_003 + s
            if budgets is not None:
                sp["max_new_tokens"] = budgets[p]
            params.append(sp)
        payload: dict[str, Any] = {
            "sampling_params": params,
            "return_logprob": True,
            "return_routed_experts": return_routed_experts,
        }
        if images is None:
            payload["input_ids"] = [ids[p] for p, _ in chunk]
        else:
            payload["text"] = [images[p][0] for p, _ in chunk]
            payload["image_data"] = [images[p][1] for p, _ in chunk]
        outputs = self.request(self._pick(), "POST", "/generate", payload)
        if len(outputs) != len(chunk):
            raise RolloutError(f"SGLang returned {len(outputs)} outputs for {len(chunk)} inputs")
        if images is not None:
            for (p, _), out in zip(chunk, outputs, strict=True):
                served = out["meta_info"].get("prompt_tokens")
                if served != len(ids[p]):
                    raise RolloutError(
                        f"image prompt {p}: SGLang expanded it to {served} tokens, the policy's processor to "
                        f"{len(ids[p])}: the server's processor sizes the images differently (check "
                        "data.min_pixels / max_pixels against the served model's preprocessor_config.json)"
                    )
        return [
            _generation(out, p, s, ids[p], return_routed_experts, self.top_k)
            for (p, s), out in zip(chunk, outputs, strict=True)
        ]

    def interrupt(self) -> None:
        """End the generations in flight on every server now (SGLang's /abort_request for all requests:
        each returns its tokens and log-probs so far, finish_reason "abort"); chunks of the current
        `generate` call not sent yet are not sent. SGLang's own /pause_generation (mode "abort") does the
        same but polls in 1 s sleeps until the requests are gone, longer than a CPU step."""
        self._interrupted.set()
        # a dead server fails its generate, which handles the restart: its error is only logged here
        for exc in self.on_every_server("/abort_request", {"abort_all": True}, retry=False, timeout=10.0):
            log.debug("interrupt: %s", exc)

    def release_memory(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        """Free the servers' GPU memory (colocated runs, before training); GPU servers only.

        SGLang 0.5.23 crashes a CPU server on this call (it synchronizes CUDA), so it is refused here.
        """
        self._require_gpu("release_memory")
        self._raise_first(
            self.on_every_server("/release_memory_occupation", {"tags": list(tags)}, retry=False)
        )

    def resume_memory(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        """Re-allocate what `release_memory` freed (weights must be synced again afterwards)."""
        self._require_gpu("resume_memory")
        self._raise_first(
            self.on_every_server("/resume_memory_occupation", {"tags": list(tags)}, retry=False)
        )

    def _require_gpu(self, what: str) -> None:
        cpu = [e.url for e in self.endpoints if e.server is not None and e.server.config.device == "cpu"]
        if cpu:
            raise RolloutError(f"{what} is GPU-only (SGLang calls CUDA for it); CPU servers: {cpu}")

    def flush_cache(self) -> None:
        self._raise_first(self.on_every_server("/flush_cache"))

    def on_every_server(
        self, path: str, payload: dict | None = None, *, retry: bool = True, timeout: float | None = None
    ) -> list[RolloutError]:
        """POST `path` to every server at once (one thread each: at 64 servers a slow or dead one must
        not hold back the others by its timeout); the servers' errors, in endpoint order."""

        def post(endpoint: Endpoint) -> RolloutError | None:
            try:
                self.request(endpoint, "POST", path, payload, retry=retry, timeout=timeout)
            except RolloutError as exc:
                return exc
            return None

        with ThreadPoolExecutor(max_workers=min(len(self.endpoints), 64)) as pool:
            errors = list(pool.map(post, self.endpoints))
        return [e for e in errors if e is not None]

    @staticmethod
    def _raise_first(errors: list[RolloutError]) -> None:
        if errors:
            raise errors[0]

    def shutdown(self) -> None:
        for endpoint in self.endpoints:
            if endpoint.server is not None:
                endpoint.server.stop()


def _image_payloads(prompts: Sequence[Prompt]) -> list[tuple[str, list[str]]] | None:
    """(chat-template text, PNG data URIs) per prompt when the prompts are `ImagePrompt`s, else None; one
    request carries either kind, not both (SGLang takes text or token ids for a whole batch)."""
    kinds = {isinstance(p, ImagePrompt) for p in prompts}
    if kinds != {True}:
        if True in kinds:
            raise RolloutError("SGLangEngine.generate: image prompts and token/text prompts in one call")
        return None
    return [(p.text, [to_data_uri(image) for image in p.images]) for p in prompts]


def _generation(
    out: dict, prompt_index: int, sample_index: int, prompt_ids: list[int], want_routing: bool, top_k: int
) -> Generation:
    meta = out["meta_info"]
    entries = meta.get("output_token_logprobs") or []
    token_ids = [int(e[1]) for e in entries]
    if "output_ids" in out and list(out["output_ids"]) != token_ids:
        raise RolloutError("SGLang output_ids and output_token_logprobs disagree")
    reason = meta.get("finish_reason") or {}
    routing = None
    if want_routing:
        if "routed_experts" not in meta:
            raise RolloutError(
                "return_routed_experts asked for, but the server sent no routing (launch it with "
                "--enable-return-routed-experts; SGLang 0.5.23 supports that on GPU only: its capturer "
                "pins host memory through CUDA)"
            )
        flat = np.frombuffer(base64.b64decode(meta["routed_experts"]), dtype=np.int32)
        rows = len(prompt_ids) + len(token_ids) - 1
        if not top_k or flat.size % (rows * top_k):
            raise RolloutError(f"routed_experts: {flat.size} ids do not fill [{rows}, layers, top_k={top_k}]")
        routing = flat.reshape(rows, -1, top_k)  # [prompt+response-1, MoE layers, top_k]
    return Generation(
        prompt_index=prompt_index,
        sample_index=sample_index,
        prompt_ids=prompt_ids,
        token_ids=token_ids,
        logprobs=[float(e[0]) for e in entries],
        finish_reason=reason.get("type", "stop") if isinstance(reason, dict) else str(reason),
        weight_version=str(meta.get("weight_version")),
        text=out.get("text"),
        routed_experts=routing,
    )


def _model_sizes(model_path: str) -> tuple[int, int]:
    """(vocab size, experts per token or 0) of the served model, from its config.json."""
    config = Path(model_path) / "config.json"
    if not config.is_file():
        raise RolloutError(f"no config.json in {model_path}: the client needs the served model's files")
    data = json.loads(config.read_text())
    text = data.get("text_config", {})  # vision-language models keep the language model's sizes here
    size = data.get("vocab_size") or text.get("vocab_size")
    if not size:
        raise RolloutError(f"{config} has no vocab_size")
    return int(size), int(data.get("num_experts_per_tok") or text.get("num_experts_per_tok") or 0)
