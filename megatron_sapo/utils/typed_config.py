"""Typed configuration: any tree of dataclasses ← a YAML file + dotted `key=value` overrides.

    cfg = load_config(TrainJobConfig, "configs/quickstart.yaml", ["run.steps=3", "model.path=null"])
    text = dump_config(cfg)              # YAML; load_config(TrainJobConfig, <file with text>) == cfg
    print(describe_config(TrainJobConfig))    # every dotted key, its type, default and docstring

Nothing here knows the sections (the root is `train/config.py`): keys, types and docs come from the
dataclasses' fields, their type hints (int, float, bool, str, `X | None`, Literal, list[...],
dict[str, ...], nested dataclasses) and the string literal under each field. Every problem is a
`ConfigError` whose message is one line naming the dotted key, e.g.
`rollout.samples_per_prompt: expected int, got 'eight'`. Sections validate in `__post_init__`: raise
`ConfigError(msg, key="field")` (or use `check` / `check_choice`) and the loader prefixes the section's
path; a plain ValueError naming `ClassName.field` is rewritten to the dotted key too.
Tests: tests/unit/test_config.py.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import difflib
import functools
import inspect
import json
import os
import re
import textwrap
import types
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar, Union

import yaml

__all__ = [
    "ConfigError",
    "ConfigKey",
    "check",
    "check_choice",
    "check_min",
    "config_keys",
    "describe_config",
    "dump_config",
    "field_docs",
    "from_dict",
    "load_config",
    "read_config_data",
    "save_config",
    "to_dict",
    "without_fields",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, shown as one line: `<dotted key>: <problem>` (or just the problem)."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        self.message = " ".join(str(message).split())
        self.key = key
        super().__init__(f"{key}: {self.message}" if key else self.message)


def check(condition: bool, key: str, message: str) -> None:
    """Raise `ConfigError(message, key=key)` unless `condition` (for sections' `__post_init__`)."""
    if not condition:
        raise ConfigError(message, key=key)


def check_min(section: Any, *names: str, minimum: int = 1) -> None:
    """Raise a ConfigError naming the first of `names` whose value (unless None) is below `minimum`."""
    for name in names:
        value = getattr(section, name)
        check(value is None or value >= minimum, name, f"must be >= {minimum}, got {value}")


def check_choice(value: Any, choices: Iterable[Any], key: str) -> None:
    """Raise a ConfigError naming `key` unless `value` is one of `choices`."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{value!r} is not one of {', '.join(map(str, choices))}", key=key)


# ---------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2 booleans: only true/false. YAML 1.1 also reads on/off/yes/no as booleans,
    which would turn `routing_replay: off` into False."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """`cls` built from the YAML file at `path` (None = defaults) with `a.b.c=value` overrides on top.

    Override values are parsed as YAML (`3`, `0.7`, `null`, `[a, b]`, `{tau_pos: 1.0}`); where that is
    not valid YAML or does not fit the field, a string field takes the text as it is (`a: b` stays text).
    """
    return from_dict(cls, read_config_data(path, overrides))


def read_config_data(path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The YAML file's nested mappings with the overrides applied, not yet checked against any class
    (file and override syntax errors surface here, before the sections' modules are imported)."""
    data = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        _apply_override(data, item)
    return data


def from_dict(cls: type[T], data: Mapping[str, Any], *, key: str = "") -> T:
    """`cls` built from nested mappings, type-checked against its hints; missing keys keep defaults."""
    return _build(cls, data, key, base=None, root=cls)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"config file {path}: {where}{problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections, got {_kind(data)}")
    return data


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    try:
        value = _Override(text, yaml.load(text, Loader=_Loader))
    except yaml.YAMLError:
        value = text
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.get(part)
        if isinstance(child, _Override) and isinstance(child.value, dict):
            child = node[part] = child.value
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"cannot set {key}: {'.'.join(parents[: i + 1])} is not a section", key=key)
        node = child
    node[leaf] = value


class _Override(NamedTuple):
    """A command-line value: its text and its YAML reading (the text serves string fields it misfits)."""

    text: str
    value: Any


def _build(cls: type[T], data: Any, path: str, *, base: Any, root: type) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping of keys, got {_kind(data)}", key=path or None)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            raise _unknown_key(str(name), list(fields), path, root)
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(path, name)
        if name in data:
            sub_base = getattr(base, name) if base is not None else _default(f)
            kwargs[name] = _coerce(data[name], hints[name], key, base=sub_base, root=root)
        elif base is not None:
            kwargs[name] = copy.deepcopy(getattr(base, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError("missing (this key has no default)", key=key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(e.message, key=_join(path, e.key or "") or None) from None
    except (ValueError, TypeError) as e:
        raise _foreign_error(e, cls, path) from None


def _coerce(value: Any, tp: Any, key: str, *, base: Any = None, root: type) -> Any:
    if isinstance(value, _Override):
        try:
            return _coerce(value.value, tp, key, base=base, root=root)
        except ConfigError:
            if _takes_str(tp):
                return _coerce(value.text, tp, key, base=base, root=root)
            raise
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(value, options[0], key, base=base, root=root)
        for option in options:
            try:
                return _coerce(value, option, key, base=base, root=root)
            except ConfigError:
                continue
        raise _type_error(tp, value, key)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(f"{value!r} is not one of {', '.join(map(str, args))}", key=key)
    if dataclasses.is_dataclass(tp):
        base = base if dataclasses.is_dataclass(base) else None
        return _build(tp, value, key, base=base, root=root)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _type_error(tp, value, key)
        if origin is tuple and (len(args) != 2 or args[1] is not ...):
            raise TypeError(f"{key}: only list[T] and tuple[T, ...] are supported, not {tp}")
        items = [_coerce(v, args[0] if args else Any, f"{key}[{i}]", root=root) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(tp, value, key)
        kt, vt = args or (Any, Any)
        return {
            _coerce(k, kt, key, root=root): _coerce(v, vt, f"{key}.{k}", root=root) for k, v in value.items()
        }
    return _coerce_scalar(value, tp, key)


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if (tp is bool and isinstance(value, bool)) or (tp is int and number and isinstance(value, int)):
        return value
    if tp is float and (number or isinstance(value, str)):  # PyYAML reads `1e-6` (no dot) as a string
        with contextlib.suppress(ValueError):
            return float(value)
    if tp is str and (isinstance(value, str) or number):  # `weight_version: 3` means "3"
        return str(value)
    if tp not in (bool, int, float, str) and isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _type_error(tp, value, key)


def _takes_str(tp: Any) -> bool:
    return tp is str or any(_takes_str(a) for a in typing.get_args(tp) if typing.get_origin(tp) is not dict)


def _type_error(tp: Any, value: Any, key: str) -> ConfigError:
    return ConfigError(f"expected {type_name(tp)}, got {_show(value)}", key=key)


def _unknown_key(name: str, siblings: list[str], path: str, root: type) -> ConfigError:
    key = _join(path, name)
    close = difflib.get_close_matches(name, siblings, n=1)
    guesses = [_join(path, close[0])] if close else []
    if not guesses:  # the right name in the wrong section, e.g. `rollout.lr` for `optim.lr`
        everywhere = [k.key for k in config_keys(root)]
        close = difflib.get_close_matches(name, [k.rsplit(".", 1)[-1] for k in everywhere], n=1, cutoff=0.8)
        guesses = [k for k in everywhere if close and k.rsplit(".", 1)[-1] == close[0]]
    hint = f" (did you mean {' or '.join(repr(g) for g in guesses)}?)" if guesses else ""
    return ConfigError(f"unknown key '{key}'{hint}")


def _foreign_error(e: Exception, cls: type, path: str) -> ConfigError:
    """A ValueError/TypeError from a section's own validation, re-worded to name the dotted key."""
    message = " ".join(str(e).split())
    m = re.match(rf"{re.escape(cls.__name__)}\.(\w+)\s*:?\s*(.*)", message)
    if m:
        return ConfigError(m.group(2), key=_join(path, m.group(1)))
    return ConfigError(message, key=path or None)


# ---------------------------------------------------------------- dumping and describing


def to_dict(cfg: Any) -> Any:
    """Plain YAML-able data (dicts, lists, scalars) of a dataclass tree."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def dump_config(cfg: Any) -> str:
    """The config as YAML, every key spelled out; `load_config` of it gives back an equal object."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write `dump_config(cfg)` to `path` atomically (readers never see half a file); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(dump_config(cfg))
    tmp.replace(path)
    return path


class ConfigKey(NamedTuple):
    """One leaf of a config tree."""

    key: str
    """Dotted path, e.g. "rollout.sampling.temperature"."""
    type: str
    """Type as shown to users, e.g. "int | None"."""
    default: Any
    """Default value (the enclosing section's default instance's), or MISSING."""
    doc: str
    """The field's docstring on one line ("" when it has none)."""


def config_keys(cls: type, prefix: str = "") -> list[ConfigKey]:
    """Every leaf key of the dataclass tree `cls`, depth first in field order."""
    return list(_walk(cls, prefix, _instance_or_none(cls)))


def _walk(cls: type, prefix: str, instance: Any) -> Iterator[ConfigKey]:
    hints, docs = _hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = _join(prefix, f.name)
        default = getattr(instance, f.name) if instance is not None else _default(f)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, key, default if dataclasses.is_dataclass(default) else _instance_or_none(tp))
        else:
            yield ConfigKey(key, type_name(tp), default, docs.get(f.name, ""))


def describe_config(cls: type) -> str:
    """Every dotted key of `cls` with its type, default and docstring, grouped by top-level section."""
    docs = field_docs(cls)
    lines: list[str] = []
    section = None
    for k in config_keys(cls):
        head = k.key.split(".", 1)[0] if "." in k.key else ""
        if head != section:
            section = head
            doc = docs.get(head, "") if head else ""
            lines += ["", f"{head or '(top level)'}:{' ' + doc if doc else ''}"]
        default = "(required)" if k.default is dataclasses.MISSING else _flow(k.default)
        lines.append(f"  {k.key}: {k.type} = {default}")
        if k.doc:
            lines += [f"      {ln}" for ln in textwrap.wrap(k.doc, 96, break_on_hyphens=False)]
    return "\n".join(lines).lstrip("\n") + "\n"


def type_name(tp: Any) -> str:
    """A type hint as users read it: `int | None`, `list[str]`, `'a' | 'b'`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is tuple and args[-1:] == (...,):  # written as a YAML list
        return f"list[{type_name(args[0])}]"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]" if args else origin.__name__
    if dataclasses.is_dataclass(tp):
        return f"section {tp.__name__}"
    return getattr(tp, "__name__", str(tp))


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name → the string literal right under the field, from the class source (bases included).

    A class without source (built by `without_fields`) carries its docs in `__field_docs__`.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        own = klass.__dict__.get("__field_docs__")
        docs.update(own if own is not None else _parse_field_docs(klass))
    return docs


def _parse_field_docs(klass: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):
        return {}
    node = ast.parse(source).body[0]
    if not isinstance(node, ast.ClassDef):
        return {}
    docs = {}
    for stmt, nxt in zip(node.body, node.body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def without_fields(cls: type, *names: str, name: str, module: str, doc: str) -> type:
    """A dataclass with `cls`'s fields (types, defaults, docs) except `names`.

    For a section whose object needs values known only at run time: configure the rest, then build
    `cls(**asdict(options), <names>=...)`. `cls.__post_init__` is not carried over (it may need `names`).
    """
    hints = _hints(cls)
    specs = [
        (f.name, hints[f.name], dataclasses.field(default=f.default, default_factory=f.default_factory))
        for f in dataclasses.fields(cls)
        if f.init and f.name not in names
    ]
    new = dataclasses.make_dataclass(name, specs, namespace={"__doc__": doc})
    new.__module__ = module  # picklable under `module.name` (make_dataclass's module= is 3.12+)
    new.__field_docs__ = {k: v for k, v in field_docs(cls).items() if k not in names}
    return new


# ---------------------------------------------------------------- helpers


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _instance_or_none(cls: type) -> Any:
    try:
        return cls()
    except Exception:  # a section with required fields: describe it from the field defaults instead
        return None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else path or name


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _show(value: Any) -> str:
    text = _kind(value) if isinstance(value, Mapping | list | tuple) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _flow(value: Any) -> str:
    try:
        return json.dumps(to_dict(value))
    except TypeError:
        return repr(value)
