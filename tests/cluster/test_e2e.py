"""End to end on loopback: server + embedded worker + a second worker process."""

from __future__ import annotations

import json
import os
import signal

import httpx
import pytest

from .harness import Cluster, fake_backend, wait_for

pytestmark = pytest.mark.slow


def test_deploy_gateway_restart_and_failover(cluster: Cluster, model_dir) -> None:
    cluster.start_server("w1")
    w2 = cluster.start_worker("w2")
    cluster.workers_ready(2)

    api = cluster.api
    r = api.post("/v2/inference-backends", json=fake_backend())
    assert r.status_code == 201, r.text
    r = api.post("/v2/models", json={
        "name": "tiny", "local_path": str(model_dir), "backend": "fake", "replicas": 2,
        "backend_parameters": "--tp-size 1 --speculative-algorithm DSPARK",
    })  # fmt: skip
    assert r.status_code == 201, r.text

    insts = cluster.wait_running("tiny", 2)
    assert {i["worker_name"] for i in insts} == {"w1", "w2"}  # spread over both workers

    # gateway: key required, OpenAI-style 401 body without it
    r = httpx.post(f"{cluster.url}/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 401 and "message" in r.json()["error"]
    bad = {"Authorization": "Bearer sk-0000000000000000-nope"}
    assert httpx.get(f"{cluster.url}/v1/models", headers=bad).status_code == 401
    key = api.post("/v2/api-keys", json={"name": "k", "scope": ["inference"]}).json()["value"]
    auth = {"Authorization": f"Bearer {key}"}
    assert [
        m["id"] for m in httpx.get(f"{cluster.url}/v1/models", headers=auth).json()["data"]
    ] == ["tiny"]
    # an inference key cannot manage
    assert httpx.get(f"{cluster.url}/v2/models", headers=auth).status_code == 401

    ports = set()
    for _ in range(4):  # round robin reaches both instances
        r = httpx.post(f"{cluster.url}/v1/chat/completions", headers=auth, timeout=30,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["message"]["content"]
        assert text.startswith("Hello from the fake server")
        ports.add(int(text.rsplit(" ", 1)[1]))
    assert ports == {i["port"] for i in insts}

    with httpx.stream("POST", f"{cluster.url}/v1/chat/completions", headers=auth, timeout=30,
                      json={"model": "tiny", "stream": True, "messages": []}) as r:  # fmt: skip
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    streamed = "".join(json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1])
    assert streamed.startswith("Hello from the fake server on port")
    r = httpx.post(f"{cluster.url}/v1/completions", headers=auth, json={"model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

    # logs through the server, from the worker that runs the instance
    r = api.get(f"/v2/model-instances/{insts[1]['id']}/logs")
    assert r.status_code == 200 and "--speculative-algorithm DSPARK" in r.text

    # kill one instance's process: the worker restarts it
    victim = next(i for i in insts if i["worker_name"] == "w1")
    os.kill(victim["pid"], signal.SIGKILL)

    def restarted() -> bool:
        i = api.get(f"/v2/model-instances/{victim['id']}").json()
        return i["state"] == "running" and i["restart_count"] >= 1 and i["pid"] != victim["pid"]

    wait_for(restarted, 40, "killed instance back to running")

    # stop worker w2: its instance moves to w1
    w2.stop()
    wait_for(lambda: api.get("/v2/workers/w2").json()["state"] == "not_ready", 20, "w2 not ready")

    def moved() -> list[dict] | None:
        insts = cluster.instances("tiny")
        ok = all(i["state"] == "running" and i["worker_name"] == "w1" for i in insts)
        return insts if ok and len(insts) == 2 else None

    wait_for(moved, 40, "both instances running on w1")
    r = httpx.post(f"{cluster.url}/v1/chat/completions", headers=auth, timeout=30,
                   json={"model": "tiny", "messages": []})  # fmt: skip
    assert r.status_code == 200

    # scaling down to zero stops the processes
    pids = [i["pid"] for i in cluster.instances("tiny")]
    assert api.patch("/v2/models/tiny", json={"replicas": 0}).status_code == 200
    wait_for(lambda: not cluster.instances("tiny"), 20, "instances removed")
    wait_for(lambda: not any(_alive(p) for p in pids), 20, "instance processes stopped")


def test_crashing_backend_reports_error_and_server_survives(cluster: Cluster, model_dir) -> None:
    cluster.start_server("w1")
    cluster.workers_ready(1)
    api = cluster.api
    backend = {"name": "crashy", "entrypoint": "python3 -c", "framework": "cpu",
               "command": "'import sys; print(\"boom\"); sys.exit(3)' {{port}}"}  # fmt: skip
    assert api.post("/v2/inference-backends", json=backend).status_code == 201
    api.post("/v2/models", json={"name": "bad", "local_path": str(model_dir), "backend": "crashy"})

    def errored() -> dict | None:
        insts = cluster.instances("bad")
        i = insts[0] if insts else {}
        return i if i.get("state") == "error" and i["restart_count"] >= 1 else None

    inst = wait_for(errored, 30, "crash loop")
    assert "exited with code 3" in inst["state_message"]
    assert "boom" in api.get(f"/v2/model-instances/{inst['id']}/logs").text
    assert api.get("/healthz").status_code == 200

    # a deployment that fits nowhere says why
    api.post(
        "/v2/models", json={"name": "far", "local_path": "/nonexistent/model", "backend": "crashy"}
    )

    def explained() -> str | None:
        insts = cluster.instances("far")
        return insts and insts[0]["state"] == "pending" and insts[0]["state_message"]

    msg = wait_for(explained, 20, "pending reason")
    assert "no worker fits" in msg and "w1: model path not found" in msg


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().split()[2] != "Z"


def test_builtin_specserve_backend_serves_a_tiny_model(cluster: Cluster, tiny_model_path) -> None:
    """The real engine (`python -m specserve serve`) as the built-in backend."""
    cluster.start_server("w1")
    cluster.workers_ready(1)
    api = cluster.api
    r = api.post("/v2/models", json={"name": "tiny-qwen3", "local_path": tiny_model_path})
    assert r.status_code == 201 and r.json()["backend"] == "specserve"
    cluster.wait_running("tiny-qwen3", 1, timeout=120)
    key = api.post("/v2/api-keys", json={"name": "k"}).json()["value"]
    r = httpx.post(f"{cluster.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"model": "tiny-qwen3", "max_tokens": 4, "temperature": 0,
                         "messages": [{"role": "user", "content": "hi"}]}, timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
    assert r.json()["usage"]["completion_tokens"] >= 1
