"""The bitmask kernels (``csrc/bitmask.cpp``), compiled once per machine with ``torch.utils.cpp_extension`` into the
cache (``$BESA_CACHE_DIR``, else ``~/.cache/besa``), and their fallback: where they cannot be built (no C++
compiler, no ninja) or are turned off (``BESA_KERNELS=0``), every product runs dense, and ``kernels().reason`` says
why in one line. ``python -m besa.runtime.kernels`` builds them and prints what this CPU runs (``make install``)."""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ISA_NAMES", "Kernels", "kernels"]

ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512", 3: "avx512-vbmi2", 4: "avx512-vpopcntdq"}
SOURCE = Path(__file__).with_name("csrc") / "bitmask.cpp"


@dataclass(frozen=True)
class Kernels:
    """The compiled module (``None`` when it could not be built: ``reason`` says why) and the best instruction set
    of this CPU (``ISA_NAMES``)."""

    module: Any
    isa: int
    reason: str = ""

    @property
    def available(self) -> bool:
        return self.module is not None


def _build_dir() -> Path:
    import torch

    from besa.model.model_files import cache_dir

    tag = f"bitmask-torch{torch.__version__.replace('+', '-')}-py{sys.version_info[0]}{sys.version_info[1]}"
    folder = cache_dir() / "kernels" / tag
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@functools.cache
def kernels() -> Kernels:
    """The kernels of this machine, built on first use (about a minute, once); never raises."""
    if os.environ.get("BESA_KERNELS", "1") == "0":
        return Kernels(None, 0, "BESA_KERNELS=0: sparse products run dense")
    try:
        import ninja  # torch builds extensions with ninja: the wheel's binary, wherever PATH points
        from torch.utils.cpp_extension import load

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])

        module = load(
            name="besa_bitmask", sources=[str(SOURCE)], build_directory=str(_build_dir()),
            extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False,
        )  # fmt: skip
    except Exception as exc:  # a missing compiler or ninja, a failed compile: run dense, say why once
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Kernels(
            None, 0, f"besa's sparse kernels could not be built ({first}): sparse products run dense"
        )
    return Kernels(module, int(module.best_isa()))


def main() -> int:
    found = kernels()
    if found.available:
        print(f"besa sparse kernels: built ({ISA_NAMES[found.isa]})")
    else:
        print(found.reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
