"""`megatron-sapo train` that SIGKILLs itself at one point; for tests/e2e/test_trainer.py's kill-point tests.

    python tests/e2e/_killed_train.py POINT CONFIG.yaml [key=value ...]

POINT: `first_save` (the first checkpoint save begins: nothing saved, step 1's metrics row not yet written),
`mid_save` (inside the first save, every file written, before the rename into place), `mid_export` (the
final Hugging Face export, shards written, before its rename). Patched here, not in the library.
"""

from __future__ import annotations

import os
import signal
import sys


def _die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    point, argv = sys.argv[1], sys.argv[2:]
    from megatron_sapo import cli
    from megatron_sapo.bridge import snapshot
    from megatron_sapo.megatron import checkpoint
    from megatron_sapo.train import loop

    if point == "first_save":
        loop.save_checkpoint = _die
    elif point == "mid_save":
        checkpoint._publish = _die
    elif point == "mid_export":
        copy_assets = snapshot.copy_assets

        def copy_then_die(src, dst):
            if os.path.basename(dst) == "hf.tmp":  # the final export, not the initial hf_init
                _die()
            return copy_assets(src, dst)

        snapshot.copy_assets = copy_then_die
    else:
        raise SystemExit(f"unknown kill point {point!r}")
    return cli.main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
