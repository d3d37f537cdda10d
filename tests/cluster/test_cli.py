"""The `specserve cluster` command line: parsing and user errors (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from specserve.cli import build_parser, main


def test_cluster_subcommands_parse() -> None:
    p = build_parser()
    a = p.parse_args(["cluster", "start", "--port", "9000", "--enable-worker",
                      "--service-port-range", "41000-41010"])  # fmt: skip
    assert a.port == 9000 and a.enable_worker and a.func.__name__ == "cmd_start"
    a = p.parse_args(["cluster", "worker", "--server-url", "http://h:1", "--token", "t"])
    assert a.func.__name__ == "cmd_worker"
    a = p.parse_args(["cluster", "deploy", "create", "m", "--model-path", "/m", "--replicas", "2"])
    assert a.resource == "deploy" and a.replicas == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cluster", "deploy", "list"], "--api-key"),
        (["cluster", "deploy", "create", "m", "--password", "x"], "exactly one of --model-path"),
        (["cluster", "deploy", "list", "--password", "x", "--server-url", "http://127.0.0.1:9"],
         "cannot reach"),
        (["cluster", "worker", "--server-url", "h:1", "--token", "t"], "http://"),
        (["cluster", "worker", "--server-url", "http://h:1", "--token", "t",
          "--service-port-range", "9-1"], "port range"),
    ],
)  # fmt: skip
def test_user_errors_are_one_line_exit_2(argv, message, capsys, monkeypatch) -> None:
    monkeypatch.delenv("SPECSERVE_API_KEY", raising=False)
    monkeypatch.delenv("SPECSERVE_PASSWORD", raising=False)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cluster_commands_do_not_import_torch() -> None:
    """`specserve cluster ...` builds only its own parser (serve's imports torch: 2-10 s)."""
    import subprocess
    import sys

    code = ("import sys; from specserve.cli import main; main(['cluster', 'workers', 'list', "
            "'--password', 'x', '--server-url', 'http://127.0.0.1:9']); "
            "print('torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
    assert "cannot reach" in out.stderr


def test_binds_loopback_unless_asked() -> None:
    from specserve.cluster.cli import _worker_config
    from specserve.cluster.worker import Worker

    p = build_parser("cluster")
    a = p.parse_args(["cluster", "start", "--enable-worker"])
    assert a.host == "127.0.0.1" and a.worker_host is None
    worker = Worker(_worker_config(a, "http://127.0.0.1:8080", "t", Path("/tmp/unused")))
    assert worker.ip == worker.host == "127.0.0.1"
    a = p.parse_args(["cluster", "worker", "--server-url", "http://10.1.2.3:8080", "--token", "t",
                      "--worker-ip", "10.9.9.9", "--worker-host", "0.0.0.0"])  # fmt: skip
    worker = Worker(_worker_config(a, a.server_url, a.token, a.data_dir))
    assert (worker.ip, worker.host) == ("10.9.9.9", "0.0.0.0")
    a = p.parse_args(["cluster", "worker", "--server-url", "http://10.1.2.3:8080", "--token", "t",
                      "--worker-ip", "10.9.9.9"])  # fmt: skip
    assert Worker(_worker_config(a, a.server_url, a.token, a.data_dir)).host == "10.9.9.9"


def test_help_gives_units() -> None:
    p = build_parser("cluster")
    sub = p._subparsers._group_actions[0].choices["cluster"]  # noqa: SLF001
    start = sub._subparsers._group_actions[0].choices["start"].format_help()  # noqa: SLF001
    for flag in ("--heartbeat-timeout", "--schedule-interval", "--heartbeat-interval",
                 "--restart-backoff"):  # fmt: skip
        line = start.split("\n  " + flag, 1)[1].split("\n  --", 1)[0]
        assert "seconds" in " ".join(line.split()), flag
