"""The keys that lock an SGLang server: which key each route needs, how keys are made, stored and read.

    key = EngineKey.generate()              # fresh random api + admin key (every server a run launches)
    key.headers("/generate")                # {"Authorization": "Bearer <api key>"}
    key.headers("/update_weights_from_disk")  # the admin key: a weight/cache/memory route
    key.save(path); EngineKey.load(path)    # a mode-0600 YAML file, also usable as SGLang's `--config`
    EngineKey.from_env()                    # servers the user started (rollout.urls)

SGLang 0.5.23 (sglang/srt/utils/auth.py, entrypoints/http_server.py), checked against a real server by
tests/e2e/test_engine_key.py:
- `--api-key` locks every route but /health*, /ready*, /metrics*; `--admin-api-key` locks the routes
  marked ADMIN_OPTIONAL (weight updates, /flush_cache, memory release/resume, abort, profiling, ...),
  which then accept only the admin key, while the others accept only the api key. A refused request
  gets 401 {"error": "Unauthorized"} and never reaches the handler.
- Keys travel as `Authorization: Bearer <key>`.
- The keys can only be set by flags: no environment variable. `--config file.yaml` is expanded inside
  the server process, so `SGLangServer` passes the keys that way and `ps` shows the file's path only.
  SGLang logs its arguments (keys included) at start-up; `orphan_guard.py` masks them in the log.
- Auth is wired only with one tokenizer worker (`--tokenizer-worker-num 1`, the default).
- /server_info returns the server's arguments, the admin key included, to any holder of the api key:
  the admin key separates routes, it does not protect them from someone who has the api key.

Servers the user started (`rollout.urls`): the client sends MEGATRON_SAPO_ENGINE_API_KEY and, for the
admin routes, MEGATRON_SAPO_ENGINE_ADMIN_KEY (or the api key when that is unset: SGLang accepts the api
key there when it was started without an admin key).
Tests: tests/unit/test_engine_key.py, tests/e2e/test_engine_key.py.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import yaml

API_KEY_ENV = "MEGATRON_SAPO_ENGINE_API_KEY"
ADMIN_KEY_ENV = "MEGATRON_SAPO_ENGINE_ADMIN_KEY"

ADMIN_ROUTES = frozenset(
    {
        "/abort_request",
        "/begin_weight_update",
        "/destroy_weights_update_group",
        "/end_weight_update",
        "/flush_cache",
        "/continue_generation",
        "/init_weights_update_group",
        "/pause_generation",
        "/release_memory_occupation",
        "/resume_memory_occupation",
        "/update_weight_version",
        "/update_weights_from_disk",
        "/update_weights_from_distributed",
        "/update_weights_from_tensor",
    }
)
"""The routes this package calls that SGLang marks ADMIN_OPTIONAL (they take the admin key)."""


@dataclass(frozen=True)
class EngineKey:
    """The api key (generation, model info) and admin key (weights, cache, memory) of a server."""

    api: str | None = field(default=None, repr=False)
    """Bearer key of the ordinary routes; None = the server has no key."""
    admin: str | None = field(default=None, repr=False)
    """Bearer key of the admin routes; None = the api key (a server started without an admin key)."""

    @classmethod
    def generate(cls) -> EngineKey:
        """Two fresh 256-bit keys in hex: SGLang turns its `--config` file back into command-line flags,
        where a urlsafe key that starts with "-" reads as a flag ("--api-key: expected one argument")."""
        return cls(api=secrets.token_hex(32), admin=secrets.token_hex(32))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> EngineKey:
        env = os.environ if environ is None else environ
        return cls(api=env.get(API_KEY_ENV) or None, admin=env.get(ADMIN_KEY_ENV) or None)

    def for_route(self, path: str) -> str | None:
        """The key a request to `path` (query string allowed) must carry."""
        if path.split("?", 1)[0] in ADMIN_ROUTES:
            return self.admin or self.api
        return self.api

    def headers(self, path: str) -> dict[str, str]:
        key = self.for_route(path)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def strings(self) -> list[str]:
        """The key strings, to mask in logs."""
        return [k for k in (self.api, self.admin) if k]

    def sglang_options(self) -> dict[str, str]:
        """The keys as SGLang `--config` YAML entries (its flag names, dashes included)."""
        options = {"api-key": self.api, "admin-api-key": self.admin}
        return {k: v for k, v in options.items() if v}

    def save(self, path: str | Path) -> Path:
        """Write the keys to `path` (mode 0600, atomically replaced); SGLang reads it as `--config`."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            yaml.safe_dump(self.sglang_options(), fh)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> EngineKey:
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls(api=data.get("api-key"), admin=data.get("admin-api-key"))
