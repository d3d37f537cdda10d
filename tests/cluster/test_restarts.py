"""Instance ids are never reused, so a worker never mistakes a new instance for an old one.

Regression for: `instances restart` left the new row `scheduled` while the old process kept
serving, and delete-then-create within one heartbeat kept the old process of the old backend.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from specserve.cli import main

from .harness import PASSWORD, Cluster, fake_backend, wait_for

pytestmark = pytest.mark.slow
HEARTBEAT_S = "3"  # long enough that delete + create land between two heartbeats


def serving_processes(model_dir: Path) -> dict[int, str]:
    """pid -> command line of every live fake server for `model_dir`."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            zombie = (entry / "stat").read_text().split()[2] == "Z"
        except OSError:
            continue
        if not zombie and "fake_openai_server.py" in cmd and str(model_dir) in cmd:
            out[int(entry.name)] = cmd
    return out


def one_new_instance(cluster: Cluster, model: str, old: dict, model_dir: Path) -> dict:
    """Wait until `model` has exactly one running instance, not `old`, and one process."""

    def settled() -> dict | None:
        insts = cluster.instances(model)
        if len(insts) != 1 or insts[0]["state"] != "running" or insts[0]["id"] == old["id"]:
            return None
        procs = serving_processes(model_dir)
        return insts[0] if list(procs) == [insts[0]["pid"]] else None

    try:
        return wait_for(settled, 40, f"one new running instance of {model}")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{serving_processes(model_dir)}\n{cluster.logs()}") from None


def chat(cluster: Cluster, key: str, model: str) -> dict:
    r = httpx.post(f"{cluster.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"model": model, "messages": []}, timeout=30)  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def test_restart_and_recreate_leave_one_new_process(cluster: Cluster, model_dir: Path) -> None:
    cluster.start_server(
        "w1", extra=["--heartbeat-interval", HEARTBEAT_S, "--heartbeat-timeout", "10"]
    )
    cluster.workers_ready(1)
    api = cluster.api
    assert api.post("/v2/inference-backends", json=fake_backend("fake")).status_code == 201
    named = fake_backend("fake-named")
    named["command"] += " --served-model-name {{model_name}}"
    assert api.post("/v2/inference-backends", json=named).status_code == 201
    key = api.post("/v2/api-keys", json={"name": "k"}).json()["value"]
    dep = {"name": "tiny", "local_path": str(model_dir), "backend": "fake"}
    assert api.post("/v2/models", json=dep).status_code == 201
    first = cluster.wait_running("tiny", 1)[0]

    # `specserve cluster instances restart ID` through the CLI
    argv = ["cluster", "instances", "restart", str(first["id"]), "--server-url", cluster.url,
            "--password", PASSWORD]  # fmt: skip
    assert main(argv) == 0
    second = one_new_instance(cluster, "tiny", first, model_dir)
    assert second["id"] > first["id"]
    assert chat(cluster, key, "tiny")["pid"] == second["pid"]
    logs = api.get(f"/v2/model-instances/{second['id']}/logs").text
    assert logs.count("starting:") == 1  # its own log file, not shared with the old instance

    # delete the deployment and create it again with another backend, within one heartbeat
    assert api.delete("/v2/models/tiny").status_code == 204
    assert api.post("/v2/models", json={**dep, "backend": "fake-named"}).status_code == 201
    third = one_new_instance(cluster, "tiny", second, model_dir)
    assert third["id"] > second["id"]
    assert "--served-model-name tiny" in serving_processes(model_dir)[third["pid"]]
    answer = chat(cluster, key, "tiny")
    assert answer["pid"] == third["pid"] and answer["model"] == "tiny"
    assert not os.path.exists(f"/proc/{second['pid']}/cmdline") or second["pid"] not in (
        serving_processes(model_dir)
    )
