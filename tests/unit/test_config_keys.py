"""Every leaf key of a `megatron-sapo train` config is read by code, not only defined and validated.

A key that is accepted, validated and then ignored lies to the user. This test reads the package's
sources with `ast` and, for each leaf field of every section reachable from `TrainJobConfig` (plus
`ServerConfig`, which `rollout.server` is copied into), looks for an attribute read `x.field` whose
receiver `x` resolves to that section's class:
- `cfg.<section>` / `<...>.<section>` (a section is named by the field that holds it: `rollout.sampling`);
- a name bound to such an expression or annotated with the class (`r = cfg.rollout`, `loss: LossConfig`);
- `self.<attr>` where an `__init__`-style method stored such a value in `self.<attr>`;
- `self` in the class's own methods (or a base class's: `SyntheticDataConfig` extends `ArithmeticTask`);
- `asdict(x)` / `to_sglang()`-style `asdict(self)`: every field of x is passed on whole.
Reads inside any `__post_init__` (validation) never count. A generic name such as `dtype` therefore only
counts where the receiver is the section, not a tensor.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import megatron_sapo
from megatron_sapo.rollout.server import ServerConfig
from megatron_sapo.train.config import TrainJobConfig

PACKAGE = Path(megatron_sapo.__file__).parent


def _dataclass_types(tp: object) -> list[type]:
    return [t for t in (tp, *typing.get_args(tp)) if isinstance(t, type) and dataclasses.is_dataclass(t)]


def _sections() -> tuple[dict[type, set[str]], dict[str, type]]:
    """Every config class with the field names that hold it, and field name -> class for sections."""
    held: dict[type, set[str]] = {TrainJobConfig: {"cfg"}, ServerConfig: set()}
    todo = [TrainJobConfig]
    while todo:
        klass = todo.pop()
        for name, tp in typing.get_type_hints(klass).items():
            for sub in _dataclass_types(tp):
                if sub not in held:
                    todo.append(sub)
                held.setdefault(sub, set()).add(name)
    by_name = {name: klass for klass, names in held.items() for name in names}
    return held, by_name


HELD, SECTION_BY_NAME = _sections()
BY_CLASS_NAME = {klass.__name__: klass for klass in HELD}


def _leaves(klass: type) -> list[str]:
    hints = typing.get_type_hints(klass)
    return [f.name for f in dataclasses.fields(klass) if not _dataclass_types(hints[f.name])]


def _annotated_class(node: ast.expr | None) -> type | None:
    for sub in ast.walk(node) if node is not None else ():
        if isinstance(sub, ast.Name) and sub.id in BY_CLASS_NAME:
            return BY_CLASS_NAME[sub.id]
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and sub.value in BY_CLASS_NAME:
            return BY_CLASS_NAME[sub.value]
    return None


class _Reads(ast.NodeVisitor):
    """Collects (class, field) reads in one module."""

    def __init__(self) -> None:
        self.reads: set[tuple[type, str]] = set()
        self.self_attrs: dict[str, type] = {}  # of the class being visited
        self.own: list[type] = []  # config classes whose methods are being visited (self is one)

    def resolve(self, node: ast.expr, env: dict[str, type]) -> type | None:
        if isinstance(node, ast.Name):
            if node.id == "self" and self.own:
                return self.own[-1]
            return env.get(node.id)
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "self" and node.attr in self.self_attrs:
                return self.self_attrs[node.attr]
            if node.attr in SECTION_BY_NAME:
                return SECTION_BY_NAME[node.attr]
        return None

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        klass = BY_CLASS_NAME.get(node.name)
        config_classes = [k for k in HELD if node.name in {b.__name__ for b in k.__mro__}]
        saved = self.self_attrs, self.own
        self.self_attrs = {}
        self.own = [*self.own, *config_classes] if klass is None else [*self.own, klass]
        if not config_classes:
            self.own = saved[1]
        for method in node.body:  # first what the methods store on self, then the reads
            if isinstance(method, ast.FunctionDef):
                self._env(method)
        self.generic_visit(node)
        self.self_attrs, self.own = saved

    def _env(self, fn: ast.FunctionDef) -> dict[str, type]:
        env: dict[str, type] = {}
        for arg in [*fn.args.args, *fn.args.kwonlyargs]:
            klass = _annotated_class(arg.annotation)
            if klass is not None:
                env[arg.arg] = klass
        for _ in range(2):  # aliases of aliases
            for node in ast.walk(fn):
                if not isinstance(node, ast.Assign):
                    continue
                for target in node.targets:
                    pairs = [(target, node.value)]
                    if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                        pairs = list(zip(target.elts, node.value.elts))
                    for t, v in pairs:
                        klass = self.resolve(v, env)
                        if klass is None:
                            continue
                        if isinstance(t, ast.Name):
                            env[t.id] = klass
                        elif (
                            isinstance(t, ast.Attribute)
                            and isinstance(t.value, ast.Name)
                            and t.value.id == "self"
                        ):
                            self.self_attrs[t.attr] = klass
        return env

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        if node.name == "__post_init__":
            return  # validation is not use
        env = self._env(node)
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Load):
                klass = self.resolve(sub.value, env)
                if klass is not None:
                    self.reads.add((klass, sub.attr))
            elif (
                isinstance(sub, ast.Call)
                and getattr(sub.func, "attr", getattr(sub.func, "id", "")) == "asdict"
            ):
                klass = self.resolve(sub.args[0], env) if sub.args else None
                for field in _leaves(klass) if klass is not None else ():
                    self.reads.add((klass, field))


def _all_reads() -> set[tuple[type, str]]:
    reads: set[tuple[type, str]] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        visitor = _Reads()
        visitor.visit(ast.parse(path.read_text(), str(path)))
        reads |= visitor.reads
    return reads


def test_every_leaf_key_is_read_somewhere():
    reads = _all_reads()
    unread = []
    for klass, names in HELD.items():
        for field in _leaves(klass):
            # a field inherited from a base dataclass (ArithmeticTask) is read through the base's methods
            owners = [k for k in klass.__mro__ if dataclasses.is_dataclass(k) and field in k.__annotations__]
            if not any((k, field) in reads or (klass, field) in reads for k in owners):
                path = "/".join(sorted(names)) or klass.__name__
                unread.append(f"{klass.__name__}.{field} (section {path})")
    assert not unread, "config keys nothing reads:\n" + "\n".join(sorted(unread))


def test_the_scan_sees_a_key_that_is_only_validated(tmp_path, monkeypatch):
    """The scan itself: a field read only in __post_init__ is reported, one read through an alias is not."""
    source = """
class RunSettings:
    def __post_init__(self):
        check(self.log_every > 0)
def use(cfg):
    r = cfg.run
    return r.keep_last
"""
    visitor = _Reads()
    visitor.visit(ast.parse(source))
    run = SECTION_BY_NAME["run"]
    assert (run, "keep_last") in visitor.reads
    assert (run, "log_every") not in visitor.reads
