"""Package definition for megatron_sapo (SAPO RL post-training on Megatron-Core + SGLang).

CPU/CI pins follow ../shared/DESIGN.md: on Python 3.11 the newest megatron-core is 0.16.1, and
sglang 0.5.23 pins torch 2.14.1 + transformers 5.19.0. GPU clusters may use newer megatron-core; the
version-specific code lives in megatron_sapo/megatron/cpu.py and megatron_sapo/megatron/compat.py.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _requirements(name: str) -> list[str]:
    lines = (HERE / "requirements" / name).read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip() and not ln.startswith("-")]


setup(
    name="megatron_sapo",
    version="0.1.0",
    description="Soft Adaptive Policy Optimization (SAPO) RL post-training on Megatron-Core with SGLang rollouts",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_sapo", "megatron_sapo.*"]),
    install_requires=_requirements("base.txt"),
    extras_require={
        "dev": _requirements("dev.txt"),
        # sglang's pure-Python requirements; sglang itself goes in with --no-deps (`make install-sglang`),
        # because its declared deps are ~1.4 GB of CUDA kernel packages that cannot run on CPU anyway.
        "sglang": _requirements("sglang.txt"),
        "gpu": _requirements("gpu.txt"),
    },
    entry_points={"console_scripts": ["megatron-sapo=megatron_sapo.cli:main"]},
)
