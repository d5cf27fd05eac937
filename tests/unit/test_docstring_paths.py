"""Every repository path named in a docstring or comment under megatron_sapo/ exists.

Module docstrings are the map of this code ("Tests: tests/unit/test_x.py", "see megatron/cpu.py"); a
path that no longer exists sends a reader nowhere. Paths are recognised by their first component (a
top-level folder of the repository, or a package of megatron_sapo/, which are also accepted relative
to megatron_sapo/ when they name a file or a folder: `megatron/cpu.py`, `bridge/arch/`); `*` globs must match at least one file; placeholders (`<...>`, `{...}`) and
run-time output paths (outputs/, /tmp, ...) are not paths of the repository and are skipped.
"""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import megatron_sapo

PACKAGE = Path(megatron_sapo.__file__).parent
ROOT = PACKAGE.parent
TOP = ("megatron_sapo", "tests", "tools", "examples", "configs", "benchmarks", "docs", "requirements")
SUBPACKAGES = tuple(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
PATH = re.compile(rf"(?<![\w./<-])((?:{'|'.join(TOP + SUBPACKAGES)})/[\w.*/-]*[\w*/])")


def _texts(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal and comment of a module."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type in (tokenize.STRING, tokenize.COMMENT):
            out.append((tok.start[0], tok.string))
    return out


def _exists(name: str) -> bool:
    name = name.rstrip("/.")
    for base in (ROOT, PACKAGE):
        if "*" in name and any(base.glob(name)):
            return True
        if (base / name).exists():
            return True
    return False


def test_paths_named_in_the_package_exist():
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, text in _texts(path):
            for match in PATH.finditer(text):
                name = match.group(1)
                after = text[match.end() : match.end() + 1]
                if after in "<{" and after:
                    continue  # a placeholder follows: tests/<tier>/..., logs/{node}
                if name.split("/")[0] not in TOP and not re.search(r"(\.\w+|/)$", name):
                    continue  # "rollout/restarts", "train/eval": metric keys, not package-relative files
                if not _exists(name):
                    missing.append(
                        f"{path.relative_to(ROOT)}:{line + text[: match.start()].count(chr(10))}: {name}"
                    )
    assert not missing, "paths named in megatron_sapo/ that do not exist:\n" + "\n".join(missing)


def test_the_scan_finds_a_missing_path(tmp_path):
    assert PATH.search("Tests: tests/unit/test_nope.py").group(1) == "tests/unit/test_nope.py"
    assert PATH.search("see megatron/compat.py.").group(1) == "megatron/compat.py"
    assert PATH.search("metric rollout/restarts").group(1) == "rollout/restarts"  # matched, then skipped
    assert not _exists("tests/unit/test_nope.py") and not _exists("megatron/compat.py")
    assert _exists("megatron/cpu.py") and _exists("tests/unit/") and _exists("bridge/arch/*.py")
