"""Reward functions by name: "math_verify", "exact_match", or "python:package.module:function".

A reward function is `fn(response_text: str, record: PromptRecord) -> float`. A user function named by
its Python path is imported here (and again, by name, in each `RewardRunner` worker), so it must be a
module-level attribute of an importable module.
"""

from __future__ import annotations

import importlib
import traceback

from megatron_sapo.rewards.runner import RewardFn

PYTHON_PREFIX = "python:"
REWARDS: dict[str, str] = {
    "math_verify": "megatron_sapo.rewards.mathverify:math_verify_reward",
    "exact_match": "megatron_sapo.rewards.exact_match:exact_match",
}
"""Built-in names → 'module:function' (imported lazily: math-verify pulls in sympy)."""


def get_reward(name: str) -> RewardFn:
    """The reward function called `name` (a key of REWARDS or 'python:package.module:function')."""
    if name in REWARDS:
        return _import(REWARDS[name], name)
    if name.startswith(PYTHON_PREFIX):
        return _import(name[len(PYTHON_PREFIX) :], name)
    raise ValueError(
        f"unknown reward {name!r}: use one of {sorted(REWARDS)} or 'python:package.module:function'"
    )


def _import(path: str, name: str) -> RewardFn:
    """The function at 'module:function'; any failure to get it is one ValueError line naming `name`."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{name!r}: expected 'python:package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name + ".").startswith(e.name + "."):
            raise ValueError(
                f"{name!r}: cannot import module {module_name!r}: not found on the Python path "
                "(add its directory to PYTHONPATH)"
            ) from e
        raise ValueError(_import_failure(name, module_name, e)) from e
    except Exception as e:  # user code runs at import: whatever it raises, say where
        raise ValueError(_import_failure(name, module_name, e)) from e
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(
                f"{name!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                f"attribute {attr!r}"
            )
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"{name!r}: {path} is a {type(fn).__name__}, not a function")
    return fn


def _import_failure(name: str, module_name: str, e: Exception) -> str:
    """'cannot import module M: <Type>: <message> (file:line)', the line being where the user's code failed
    (this module's and importlib's frames skipped)."""
    if isinstance(e, SyntaxError):
        where, text = f"{e.filename}:{e.lineno}", e.msg
    else:
        ours = (__file__, importlib.__file__)
        frames = [
            f
            for f in traceback.extract_tb(e.__traceback__)
            if f.filename not in ours and not f.filename.startswith("<frozen")
        ]
        where, text = (f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"), str(e)
    return f"{name!r}: cannot import module {module_name!r}: {type(e).__name__}: {text} ({where})"
