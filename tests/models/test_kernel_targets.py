"""The C++ kernels on a narrower vector target than this machine's.

The kernels use one register's worth of floats as their vector: 16 with AVX-512, 8 with AVX2,
4 elsewhere (`kLanes` in specserve/kernels/kernels.h). The rest of the suite runs the build for
this machine's CPU; this test builds them for a narrower x86 target (AVX2 on an AVX-512
machine, SSE2 otherwise) and runs the kernel tests against the PyTorch path and `transformers`
with that build, so every width a user's CPU may get is checked on any x86 machine.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _narrower_target() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "x86-64-v3" if " avx512f" in flags else "x86-64"


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the narrower targets named are x86")
def test_kernels_built_for_a_narrower_target_match_the_reference():
    march = _narrower_target()
    env = {**os.environ, "SPECSERVE_KERNELS_MARCH": march}
    tests = [
        "tests/models/test_attention_backends.py::test_kernel_equals_the_torch_backend",
        "tests/models/test_attention_backends.py::test_kernel_row_is_the_same_in_decode_and_verify",
        "tests/models/test_attention_backends.py::test_fused_step_equals_the_layer_by_layer_path",
        "tests/models/test_attention_backends.py::test_linear_tiled_is_row_invariant",
        "tests/models/test_attention_backends.py::test_16_bit_tiles_give_the_same_bits",
        "tests/models/test_attention_backends.py::test_decode_and_verify_logits_match_hf",
        "tests/speculative/test_fused_draft.py::test_fused_step_equals_the_torch_path",
        "tests/speculative/test_fused_draft.py::test_fused_context_rows_equal_the_torch_path",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, f"-march={march}:\n{tail}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, tail
    # the variable reaches the build's flags; the build's name hashes them, so the pytest run
    # above could not have loaded the native build from a shared cache
    check = subprocess.run(
        [sys.executable, "-c", "from specserve import kernels; print(' '.join(kernels.FLAGS))"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert f"-march={march}" in check.stdout, check.stdout + check.stderr
