"""Templates, launch specs and the process runtime."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from specserve.cluster.runtime import LaunchError, LaunchSpec, ProcessRuntime, build_launch_spec
from specserve.cluster.schemas import BackendCreate, LaunchTemplate, render_template

VALUES = {"model_path": "/m", "port": "30000", "worker_ip": "10.0.0.2", "model_name": "ds",
          "gpu_count": "2", "gpu_ids": "0,1"}  # fmt: skip


def test_seed_dspark_template_renders_to_the_seed_command(tmp_path: Path) -> None:
    v = LaunchTemplate(entrypoint="sglang serve", framework="cuda",
                       run_command="--model-path {{model_path}} --host {{worker_ip}} --port {{port}}")  # fmt: skip
    spec = build_launch_spec("ds-1", v, ["--tp-size", "8", "--speculative-algorithm", "DSPARK"],
                             {"X": "{{gpu_count}}"}, VALUES, tmp_path / "l.log", [0, 1])  # fmt: skip
    assert spec.argv == ["sglang", "serve", "--model-path", "/m", "--host", "10.0.0.2", "--port",
                         "30000", "--tp-size", "8", "--speculative-algorithm", "DSPARK"]  # fmt: skip
    assert spec.env == {"X": "2", "CUDA_VISIBLE_DEVICES": "0,1"}


def test_run_command_is_split_like_a_shell_line_unknown_placeholders_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """GPUStack's rules: render, shlex-split, unknown `{{x}}` passed through with a warning."""
    v = LaunchTemplate(run_command="serve --model {{model_path}} --chat-template "
                       "'a b {{model_name}}' --extra {{modelpath}}",
                       default_parameters=["--default", "1"])  # fmt: skip
    spec = build_launch_spec("x", v, [], {}, VALUES, tmp_path / "l.log", [])
    assert spec.argv == ["serve", "--model", "/m", "--chat-template", "a b ds", "--extra",
                         "{{modelpath}}", "--default", "1"]  # fmt: skip
    spec = build_launch_spec("x", v, ["--mine"], {}, VALUES, tmp_path / "l.log", [])
    assert spec.argv[-1] == "--mine" and "--default" not in spec.argv
    with caplog.at_level("WARNING"):
        BackendCreate(backend_name="b-custom", version_configs={"v1": {"run_command": "{{x.y}}"}})
    assert "unknown placeholder {{x.y}}" in caplog.text
    with pytest.raises(ValueError, match="no image_name, entrypoint or run_command"):
        BackendCreate(backend_name="b-custom", version_configs={"v1": {"env": {"A": "1"}}})
    assert render_template("{{ port }}/{{model_name}}", VALUES) == "30000/ds"


def test_process_runtime_logs_exit_code_and_stops_the_whole_group(tmp_path: Path) -> None:
    rt = ProcessRuntime()
    log = tmp_path / "logs" / "a.log"
    h = rt.start(
        LaunchSpec("a", [sys.executable, "-c", "print('hi'); raise SystemExit(4)"], {}, log)
    )
    deadline = time.monotonic() + 20
    while rt.exit_code(h) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rt.exit_code(h) == 4 and "hi" in log.read_text()

    script = "import subprocess,sys,time; subprocess.Popen(['sleep','60']); print('READY'.lower(),flush=True); time.sleep(60)"
    h = rt.start(LaunchSpec("b", [sys.executable, "-c", script], {}, tmp_path / "b.log"))
    while "ready" not in (tmp_path / "b.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    children = [p for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == rt.pid(h)]
    assert children
    rt.stop(h, grace_s=5)
    assert rt.exit_code(h) is not None
    time.sleep(0.2)
    assert all(not os.path.exists(f"/proc/{c}") or _zombie(c) for c in children)
    rt.stop(h)  # idempotent


def test_image_only_backend_needs_container_runtime(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="no container runtime"):
        ProcessRuntime().start(LaunchSpec("c", [], {}, tmp_path / "c.log", image="lmsysorg/sglang"))
    with pytest.raises(LaunchError, match="cannot start"):
        ProcessRuntime().start(LaunchSpec("d", ["/nonexistent/bin"], {}, tmp_path / "d.log"))


def _ppid(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _zombie(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
