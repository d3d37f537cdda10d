"""Compiled CPU kernels, built on first use with the machine's C++ compiler.

`load()` compiles `paged_attention.cpp`, `dense_step.cpp`, `draft_step.cpp`, `row_attention.cpp`
and `register.cpp` (the op registrations) with `torch.utils.cpp_extension` (ninja and the C++
compiler that `make venv` expects: gcc on a fresh machine) into torch's extension cache
(`TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`) and registers
`torch.ops.specserve.paged_attention`, `store_kv`, `linear_tiled`, `dense_layers`, `draft_block`,
`draft_hidden`, `draft_context`, `row_attention` and `mtp_chain`. The first build takes 30-60 s;
later loads reuse it. Nothing here is needed by the pure PyTorch path (`--attention-backend
torch`).

The build targets this machine's CPU (`-march=native`; `SPECSERVE_KERNELS_MARCH` names another
target, e.g. `x86-64-v3`, to test a narrower build), and its name carries the CPU's model and
flags, so a cache shared between machines never loads a build for another CPU.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import time
from pathlib import Path

import torch

from specserve.config import ConfigError

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [
    HERE / name
    for name in (
        "dense_step.cpp",
        "draft_step.cpp",
        "paged_attention.cpp",
        "row_attention.cpp",
        "register.cpp",
    )
]
HEADERS = [HERE / "kernels.h", HERE / "ops.h"]
MARCH = os.environ.get("SPECSERVE_KERNELS_MARCH", "native")
FLAGS = ["-O3", f"-march={MARCH}", "-fopenmp", "-fno-math-errno"]
STALE_LOCK_S = 600  # a build takes about a minute; an older lock was left by a killed build


class KernelUnavailable(ConfigError):
    """The compiled kernels could not be built or loaded on this machine (a setup error: the
    CLI prints it and exits)."""


def _cpu() -> str:
    """The CPU's model and instruction-set flags (what `-march=native` builds for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    keep = ("model name", "flags", "Features", "CPU part")  # x86; ARM names its own
    return "\n".join(dict.fromkeys(line for line in lines if line.startswith(keep)))


def _digest() -> str:
    """Of the sources, headers, flags and CPU: part of the build's name, so that two versions
    of the kernels (an upgrade, two checkouts) or two CPUs never share a build folder in
    torch's cache."""
    parts = [p.read_bytes() for p in (*SOURCES, *HEADERS)] + [" ".join(FLAGS).encode()]
    return hashlib.sha256(b"\0".join([*parts, _cpu().encode()])).hexdigest()[:12]


def clear_stale_lock(name: str) -> bool:
    """Remove the build lock of extension `name` if a killed build left it behind (torch's
    build waits for that file to go, forever); -> whether one was removed."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < STALE_LOCK_S:
        return False  # another process may be building right now
    log.warning("removing a stale kernel build lock %s (%.0f s old)", lock, age)
    lock.unlink(missing_ok=True)
    return True


@functools.cache
def load() -> None:
    """Build (once per machine) and load the kernels; raise `KernelUnavailable` with the cause."""
    try:
        from torch.utils.cpp_extension import load as build
    except ImportError as e:  # pragma: no cover - part of every torch build
        raise KernelUnavailable(f"torch.utils.cpp_extension is missing: {e}") from e
    name = f"specserve_kernels_{_digest()}"
    try:
        clear_stale_lock(name)
        build(
            name=name,
            sources=[str(s) for s in SOURCES],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # a missing compiler or ninja, or a compile error
        raise KernelUnavailable(
            "could not build the C++ kernels of --attention-backend cpp "
            f"({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}); "
            "it needs a C++ compiler (g++) and the ninja package, or use --attention-backend torch"
        ) from e
    if not hasattr(torch.ops.specserve, "paged_attention"):  # pragma: no cover
        raise KernelUnavailable(
            "the kernels built but torch.ops.specserve.paged_attention is missing"
        )
    log.info("loaded the C++ kernels (torch.ops.specserve)")
