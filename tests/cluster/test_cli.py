"""The `specserve cluster` command line: parsing and user errors (no server needed)."""

from __future__ import annotations

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
