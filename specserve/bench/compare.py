"""`specserve bench compare`: arms (servers) x workloads (bench serve runs) -> report.

The YAML names the arms (a `specserve serve` argument list, a generic `command:`, or an
existing `url:`) and the workloads (bench serve options). Each started arm gets a free
port, is waited on until /health answers, runs every workload, and is stopped (SIGTERM to
its process group, SIGKILL after a timeout). Results are appended to results.jsonl as they
come, so a failure part-way leaves what was measured; report.md and the plots are written
at the end from whatever succeeded, with the failures listed.
"""

from __future__ import annotations

import difflib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from specserve.bench import serve
from specserve.ports import free_port

TOP_KEYS = ("arms", "workloads", "baseline", "notes", "startup_timeout", "stop_timeout")
ARM_KEYS = ("name", "serve", "command", "url", "model")
# Per-workload bench serve options; the arm supplies the server and the model.
WORKLOAD_KEYS = ("name",) + tuple(
    k for k in serve.OPTION_NAMES if k not in ("base_url", "model", "output_file")
)


class CompareError(ValueError):
    """A compare config or arm that cannot be used: printed as one line."""


@dataclass(frozen=True)
class Arm:
    name: str
    serve: tuple[str, ...] | None = None  # arguments of `specserve serve`
    command: tuple[str, ...] | None = None  # any server command; "{port}" is substituted
    url: str | None = None  # an already running server
    model: str | None = None

    def argv(self, port: int) -> list[str]:
        """The command line to start this arm on `port` ({port} filled, else --port added)."""
        if self.serve is not None:
            base = [sys.executable, "-m", "specserve", "serve", *self.serve]
        else:
            assert self.command is not None
            base = list(self.command)
        if any("{port}" in a for a in base):
            return [a.replace("{port}", str(port)) for a in base]
        return [*base, "--port", str(port)]

    def describe(self) -> str:
        if self.url:
            return self.url
        if self.serve is not None:
            return "specserve serve " + shlex.join(self.serve)
        return shlex.join(self.command or ())


@dataclass(frozen=True)
class Workload:
    name: str
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CompareConfig:
    arms: tuple[Arm, ...]
    workloads: tuple[Workload, ...]
    baseline: str | None = None
    notes: str = ""
    startup_timeout: float = 600.0
    stop_timeout: float = 15.0

    def __post_init__(self) -> None:
        names = [a.name for a in self.arms]
        if len(self.arms) < 1 or len(self.workloads) < 1:
            raise CompareError("a compare config needs at least one arm and one workload")
        for kind, seq in (("arm", names), ("workload", [w.name for w in self.workloads])):
            dup = {n for n in seq if seq.count(n) > 1}
            if dup:
                raise CompareError(f"duplicate {kind} name(s): {', '.join(sorted(dup))}")
        if self.baseline is not None and self.baseline not in names:
            raise CompareError(
                f"baseline {self.baseline!r} is not an arm; arms: {', '.join(names)}"
            )

    def gain_pair(self) -> tuple[str, str] | None:
        """(baseline, candidate): the named baseline (else the first arm) vs the last other arm."""
        base = self.baseline or self.arms[0].name
        others = [a.name for a in self.arms if a.name != base]
        return (base, others[-1]) if others else None


def _check_keys(obj: object, allowed: tuple[str, ...], where: str) -> dict:
    if not isinstance(obj, dict):
        raise CompareError(f"{where} must be a mapping, got {type(obj).__name__}")
    for key in obj:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise CompareError(
                f"{where}: unknown key {key!r}{hint}; allowed keys: {', '.join(allowed)}"
            )
    return obj


def _argv(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(shlex.split(value))
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return tuple(str(v) for v in value)
    raise CompareError(f"{where} must be a string or a list of strings")


def parse_config(data: object, source: str = "compare config") -> CompareConfig:
    top = _check_keys(data, TOP_KEYS, source)
    arms = []
    for i, raw in enumerate(top.get("arms") or []):
        a = _check_keys(raw, ARM_KEYS, f"{source}: arm {i + 1}")
        kinds = [k for k in ("serve", "command", "url") if k in a]
        name = str(a.get("name") or f"arm{i + 1}")
        if len(kinds) != 1:
            raise CompareError(f"{source}: arm {name!r} needs exactly one of serve, command, url")
        arms.append(
            Arm(
                name=name,
                serve=_argv(a["serve"], f"arm {name!r} serve") if "serve" in a else None,
                command=_argv(a["command"], f"arm {name!r} command") if "command" in a else None,
                url=str(a["url"]).rstrip("/") if "url" in a else None,
                model=a.get("model"),
            )
        )
    workloads = []
    for i, raw in enumerate(top.get("workloads") or []):
        w = _check_keys(raw, WORKLOAD_KEYS, f"{source}: workload {i + 1}")
        name = str(w.get("name") or f"workload{i + 1}")
        options = {k: v for k, v in w.items() if k != "name"}
        try:  # validate now, not after the first server has started
            serve.config_from_options(options)
        except serve.BenchError as e:
            raise CompareError(f"{source}: workload {name!r}: {e}") from None
        workloads.append(Workload(name, options))
    try:
        timeouts = {k: float(top[k]) for k in ("startup_timeout", "stop_timeout") if k in top}
    except (TypeError, ValueError) as e:
        raise CompareError(f"{source}: bad timeout: {e}") from None
    return CompareConfig(
        arms=tuple(arms),
        workloads=tuple(workloads),
        baseline=top.get("baseline"),
        notes=str(top.get("notes") or ""),
        **timeouts,
    )


def load_config(path: str | Path) -> CompareConfig:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise CompareError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise CompareError(f"{path} is not valid YAML: {e}") from None
    return parse_config(data, str(path))


class ServerProcess:
    """A server in its own process group: started, health-checked, and always stopped."""

    def __init__(self, argv: list[str], log_path: Path, base_url: str):
        self.argv, self.log_path, self.base_url = argv, log_path, base_url
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_healthy(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        # one client for every poll: each new one loads the CA bundle (about 50 ms here)
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise CompareError(
                        f"server exited with code {self.proc.returncode} before /health "
                        f"answered; log {self.log_path}: {self.log_tail()}"
                    )
                try:
                    if client.get(f"{self.base_url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        raise CompareError(
            f"server did not answer /health within {timeout:.0f} s; log {self.log_path}"
        )

    def stop(self, timeout: float) -> None:
        """SIGTERM the process group, then SIGKILL it if it has not exited within `timeout`."""
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc.wait()
        try:  # children that outlived the leader
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log_tail(self, n: int = 300) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return " | ".join(text[-n:].strip().splitlines()[-5:])


@contextmanager
def running(arm: Arm, out_dir: Path, cfg: CompareConfig) -> Iterator[str]:
    """The arm's base URL while it runs; started and stopped here unless it is a URL arm."""
    if arm.url:
        yield arm.url
        return
    port = free_port()
    server = ServerProcess(
        arm.argv(port), out_dir / f"server-{arm.name}.log", f"http://127.0.0.1:{port}"
    )
    try:
        server.start()
        server.wait_healthy(cfg.startup_timeout)
        yield server.base_url
    finally:
        server.stop(cfg.stop_timeout)


def run_compare(config_path: str | Path, out_dir: str | Path, reverse: bool = False) -> int:
    """Run every arm on every workload and write the report. `reverse`: start the arms in the
    opposite order (the report's columns keep the config's), for rounds that alternate."""
    cfg = load_config(config_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    results_path.write_text("")
    results: list[dict] = []
    failures: list[str] = []
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # turn SIGTERM into SystemExit so that `finally` stops the servers
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        for arm in cfg.arms[::-1] if reverse else cfg.arms:
            print(f"== arm {arm.name}: {arm.describe()}", flush=True)
            try:
                with running(arm, out, cfg) as base_url:
                    for wl in cfg.workloads:
                        _run_workload(cfg, arm, wl, base_url, results_path, results, failures)
            except CompareError as e:
                failures.append(f"arm {arm.name}: {e}")
                print(f"arm {arm.name} failed: {e}", file=sys.stderr)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        from specserve.bench import plots, report

        images = plots.write_plots(results, cfg, out)
        report.write_report(cfg, results, failures, images, out / "report.md", config_path)
    print(f"Wrote {out / 'report.md'}, {results_path} and {len(images)} plots")
    return 1 if failures else 0


def _run_workload(
    cfg: CompareConfig,
    arm: Arm,
    wl: Workload,
    base_url: str,
    results_path: Path,
    results: list[dict],
    failures: list[str],
) -> None:
    options = {**wl.options, "base_url": base_url, "model": arm.model}
    options["output_file"] = str(results_path)
    options.setdefault("tag", f"{arm.name}/{wl.name}")
    print(f"-- workload {wl.name} on {arm.name}", flush=True)
    try:
        result = serve.run(
            serve.config_from_options(options), extra={"arm": arm.name, "workload": wl.name}
        )
    except serve.BenchError as e:
        failures.append(f"arm {arm.name}, workload {wl.name}: {e}")
        print(f"workload {wl.name} on {arm.name} failed: {e}", file=sys.stderr)
        return
    results.append(result)
    if not result["completed"]:
        failures.append(f"arm {arm.name}, workload {wl.name}: every request failed")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
