"""How a worker launches an instance: the launch spec (rendered command) and the runtime.

`Runtime` is the small interface a container runtime would implement next to
`ProcessRuntime`, which runs each instance as a subprocess with its logs in a file.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from specserve.cluster.schemas import LaunchTemplate, render_template


@dataclass(frozen=True)
class LaunchSpec:
    """A fully rendered instance launch: argv, extra environment, log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    image: str | None = None
    gpu_ids: list[int] = field(default_factory=list)


def build_launch_spec(
    name: str,
    launch: LaunchTemplate,
    parameters: list[str],
    env: dict[str, str],
    values: dict[str, str],
    log_path: Path,
    gpu_ids: list[int],
) -> LaunchSpec:
    """As GPUStack: `run_command` rendered with the placeholder `values` and split like a shell
    command line, after `entrypoint`; then the deployment's backend parameters (the backend's
    `default_backend_param` when it has none). Unknown placeholders stay as written."""
    argv = shlex.split(launch.entrypoint)
    argv += shlex.split(render_template(launch.run_command, values))
    argv += [render_template(p, values) for p in parameters or launch.default_parameters]
    full_env = {k: render_template(v, values) for k, v in {**launch.env, **env}.items()}
    if launch.framework == "cuda":
        full_env.setdefault("CUDA_VISIBLE_DEVICES", ",".join(map(str, gpu_ids)))
    return LaunchSpec(name, argv, full_env, log_path, launch.image_name, gpu_ids)


class LaunchError(Exception):
    """The runtime cannot launch this spec (message says why)."""


class Runtime(ABC):
    """Starts and stops instance servers on one worker.

    Contract:
    * `start(spec)` launches the server described by `spec` and returns at once with an
      opaque handle; stdout and stderr are appended to `spec.log_path`. It raises
      `LaunchError` when the spec cannot run here (e.g. an image without a container
      runtime, an entrypoint that does not exist).
    * `exit_code(handle)` is None while the server runs, else its exit code.
    * `pid(handle)` is an id shown to users (process id, container id hash).
    * `stop(handle, grace_s)` ends the server and everything it spawned: polite signal,
      then forced after `grace_s`. Idempotent; never raises for an already-dead server.
    Readiness is not the runtime's business: the worker health-checks the port.
    """

    @abstractmethod
    def start(self, spec: LaunchSpec) -> object: ...

    @abstractmethod
    def exit_code(self, handle: object) -> int | None: ...

    @abstractmethod
    def pid(self, handle: object) -> int | None: ...

    @abstractmethod
    def stop(self, handle: object, grace_s: float = 10.0) -> None: ...


class ProcessRuntime(Runtime):
    """One subprocess per instance, in its own process group (so stop() reaches children)."""

    def start(self, spec: LaunchSpec) -> subprocess.Popen:
        if not spec.argv:
            if spec.image:
                raise LaunchError(
                    f"backend uses image {spec.image!r}, but this worker has no container runtime"
                )
            raise LaunchError("backend version has no entrypoint")
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(spec.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%F %T')} starting: {shlex.join(spec.argv)}\n".encode())
            log.flush()
            try:
                return subprocess.Popen(
                    spec.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **spec.env},
                    start_new_session=True,
                )
            except OSError as e:
                raise LaunchError(f"cannot start {spec.argv[0]!r}: {e.strerror or e}") from e

    def exit_code(self, handle: object) -> int | None:
        assert isinstance(handle, subprocess.Popen)
        return handle.poll()

    def pid(self, handle: object) -> int | None:
        assert isinstance(handle, subprocess.Popen)
        return handle.pid

    def stop(self, handle: object, grace_s: float = 10.0) -> None:
        assert isinstance(handle, subprocess.Popen)
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(handle.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                handle.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue
