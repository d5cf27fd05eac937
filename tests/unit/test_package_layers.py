"""Which package of megatron_sapo may import which: the map in megatron_sapo/__init__.py, enforced.

Every `import megatron_sapo.X` / `from megatron_sapo.X import` under a package is read with `ast` (also
the ones inside functions) and checked against `LAYERS`; a new edge either follows the map or changes it
here and in the package docstring in the same commit.
"""

from __future__ import annotations

import ast
from pathlib import Path

import megatron_sapo

PACKAGE = Path(megatron_sapo.__file__).parent

# package -> the other packages it may import (lower layers only; the top-level cli.py may import all)
LAYERS: dict[str, set[str]] = {
    "utils": set(),
    "losses": set(),
    "data": {"utils"},
    "rewards": {"data", "utils"},
    "bridge": {"utils"},
    "megatron": {"losses", "bridge", "utils"},
    "convert": {"megatron", "bridge", "utils"},
    "rollout": {"data", "bridge", "utils"},
    "cluster": {"rollout", "megatron", "utils"},
    "train": {"cluster", "rollout", "convert", "megatron", "bridge", "rewards", "data", "losses", "utils"},
}


def _imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "megatron_sapo" and len(parts) > 1 and (PACKAGE / parts[1]).is_dir():
                found.add(parts[1])
    return found


def test_every_package_is_in_the_map():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(LAYERS)


def test_imports_follow_the_layers():
    wrong = []
    for package, allowed in LAYERS.items():
        for path in sorted((PACKAGE / package).rglob("*.py")):
            for used in _imported_packages(path) - allowed - {package}:
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports megatron_sapo.{used}")
    assert not wrong, "\n".join(wrong)


def test_the_map_has_no_cycle():
    seen: dict[str, int] = {}

    def depth(package: str, stack: tuple[str, ...] = ()) -> int:
        assert package not in stack, f"cycle: {' -> '.join((*stack, package))}"
        if package not in seen:
            seen[package] = 1 + max((depth(p, (*stack, package)) for p in LAYERS[package]), default=0)
        return seen[package]

    for package in LAYERS:
        depth(package)
