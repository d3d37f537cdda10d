"""GPUStack 2.3's own client bodies in, responses that validate against its schemas out.

The bodies and schemas were recorded from `gpustack==2.3.0` by `gpustack_2_3/record.py`
(GPUStack cannot be installed here: it pins fastapi and SQLAlchemy below ours). The same
script's `--live` mode drove a real `specserve cluster` with GPUStack's ClientSet.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from fastapi.testclient import TestClient

from .harness import PASSWORD
from .test_store import STATUS, app_client, register

RECORDED = Path(__file__).with_name("gpustack_2_3")
REQUESTS = json.loads((RECORDED / "requests.json").read_text())
SCHEMAS = json.loads((RECORDED / "schemas.json").read_text())


def conforms(body: dict, schema: str) -> dict:
    """Raise unless `body` validates against GPUStack's JSON Schema `schema`."""
    jsonschema.validate(body, SCHEMAS[schema])
    return body


@pytest.fixture
def c(tmp_path: Path) -> TestClient:
    with app_client(tmp_path, f"sqlite:///{tmp_path / 'store.db'}") as client:
        client.auth = ("admin", PASSWORD)
        yield client


def test_recorded_from_gpustack_2_3() -> None:
    assert REQUESTS["gpustack_version"] == "v2.3.0"
    # what the client really sends: every field, mostly null or default
    assert (
        REQUESTS["model"]["restart_on_error"] is True and "speculative_config" in REQUESTS["model"]
    )


def test_backend_bodies_and_yaml_are_accepted_unchanged(c: TestClient) -> None:
    r = c.post("/v2/inference-backends", json=REQUESTS["backend"])
    assert r.status_code == 201, r.text
    backend = conforms(r.json(), "InferenceBackendPublic")
    assert backend["backend_name"] == "specserve-custom"
    assert backend["version_configs"]["cuda-custom"]["custom_framework"] == "cuda"
    assert backend["default_backend_param"] == ["--speculative-algorithm", "DSPARK"]

    r = c.post("/v2/inference-backends/from-yaml", json=REQUESTS["backend_from_yaml"])
    assert r.status_code == 201, r.text
    yaml_backend = conforms(r.json(), "InferenceBackendPublic")
    assert "{{model_name}}" in yaml_backend["version_configs"]["cpu-custom"]["run_command"]

    page = conforms(c.get("/v2/inference-backends").json(), "InferenceBackendsPublic")
    names = [b["backend_name"] for b in page["items"]]
    assert names == ["specserve", "specserve-custom", "specserve-yaml-custom"]
    assert page["pagination"] == {"page": 1, "perPage": 100, "total": 3, "totalPage": 1}
    page = c.get("/v2/inference-backends", params={"page": 2, "perPage": 2}).json()
    assert [b["backend_name"] for b in page["items"]] == ["specserve-yaml-custom"]
    assert page["pagination"] == {"page": 2, "perPage": 2, "total": 3, "totalPage": 2}

    # PUT by id replaces the backend and answers 200
    body = {**REQUESTS["backend"], "description": "changed", "default_version": "cuda-custom"}
    r = c.put(f"/v2/inference-backends/{backend['id']}", json=body)
    assert r.status_code == 200 and r.json()["default_version"] == "cuda-custom"
    assert r.json()["description"] == "changed"

    bad = {"content": "backend_name: [unclosed"}
    r = c.post("/v2/inference-backends/from-yaml", json=bad)
    assert r.status_code == 400 and "invalid YAML" in r.json()["error"]["message"]
    r = c.post("/v2/inference-backends/from-yaml", json={})
    assert r.status_code == 400 and "content" in r.json()["error"]["message"]
    r = c.post("/v2/inference-backends", json={**REQUESTS["backend"], "backend_name": "x-custom",
                                               "parameter_format": "equal"})  # fmt: skip
    assert r.status_code == 400 and "parameter_format" in r.json()["error"]["message"]


def test_model_bodies_instances_and_workers(c: TestClient) -> None:
    assert c.post("/v2/inference-backends", json=REQUESTS["backend"]).status_code == 201
    r = c.post("/v2/models", json={**REQUESTS["model"], "replicas": 1})
    assert r.status_code == 201, r.text
    model = conforms(r.json(), "ModelPublic")
    assert (model["source"], model["local_path"]) == ("local_path", "/models/demo/target")
    assert model["categories"] == ["llm"] and model["cluster_id"] == 1
    r = c.post("/v2/models", json=REQUESTS["model_huggingface"])
    assert r.status_code == 201, r.text
    assert conforms(r.json(), "ModelPublic")["huggingface_repo_id"] == "Qwen/Qwen3-0.6B"
    conforms(c.get("/v2/models").json(), "ModelsPublic")

    # PUT by id with the whole object (as GPUStack's UI and client do) -> 200
    r = c.put(f"/v2/models/{model['id']}", json={**REQUESTS["model"], "replicas": 0})
    assert r.status_code == 200 and r.json()["replicas"] == 0
    r = c.put(f"/v2/models/{model['id']}", json={**REQUESTS["model"], "local_path": "/other"})
    assert r.status_code == 400 and "local_path" in r.json()["error"]["message"]
    c.put(f"/v2/models/{model['id']}", json={**REQUESTS["model"], "replicas": 1})

    _, wid, cred = register(c, "w1")
    c.post(f"/v2/workers/{wid}/heartbeat", json=STATUS, auth=cred)
    for _ in range(100):  # the controller creates the instance
        page = c.get("/v2/model-instances", params={"model_id": model["id"]}).json()
        if page["items"]:
            break
    conforms(page, "ModelInstancesPublic")
    inst = page["items"][0]
    assert inst["model_id"] == model["id"] and inst["source"] == "local_path"
    assert inst["state"] in ("pending", "scheduled")
    workers = conforms(c.get("/v2/workers").json(), "WorkersPublic")
    assert workers["items"][0]["status"]["memory"]["total"] == STATUS["memory_total"]

    for field, value in [("gpu_selector", {"gpu_ids": ["w1:cuda:0"]}), ("speculative_config", {"enabled": True}),
                         ("enable_model_route", False), ("cluster_id", 7)]:  # fmt: skip
        r = c.post("/v2/models", json={**REQUESTS["model"], "name": "n", field: value})
        assert r.status_code == 400 and field in r.json()["error"]["message"], (field, r.text)


def test_api_keys_and_form_login(c: TestClient) -> None:
    r = c.post("/v2/api-keys", json=REQUESTS["api_key"])
    assert r.status_code == 201, r.text
    key = conforms(r.json(), "ApiKeyPublic")
    assert key["value"].startswith(f"gpustack_{key['access_key']}_") and key["scope"] == [
        "inference"
    ]
    assert key["expires_at"] is not None
    c.auth = None
    bearer = {"Authorization": f"Bearer {key['value']}"}
    assert c.get("/v1/models", headers=bearer).status_code == 200
    assert c.get("/v2/models", headers=bearer).status_code == 401

    # GPUStack's /auth/login takes form fields and sets a session cookie
    r = c.post("/auth/login", data={"username": "admin", "password": "wrong"})
    assert r.status_code == 401
    r = c.post("/auth/login", data={"username": "admin", "password": PASSWORD})
    assert r.status_code == 200 and c.get("/v2/models").status_code == 200


def test_deploy_backend_yaml_registers_and_renders_the_documented_command(c: TestClient) -> None:
    """deploy/gpustack/specserve-backend.yaml through from-yaml, as its README says."""
    import shlex

    import yaml

    from specserve.cluster.db import Model
    from specserve.cluster.runtime import build_launch_spec
    from specserve.cluster.scheduler import launch_template

    text = (Path(__file__).parents[2] / "deploy/gpustack/specserve-backend.yaml").read_text()
    data = yaml.safe_load(text)
    # GPUStack 2.3 requires the -custom suffix on custom backends and their versions
    assert data["backend_name"].endswith("-custom")
    assert all(v.endswith("-custom") for v in data["version_configs"])
    r = c.post("/v2/inference-backends/from-yaml", json={"content": text})
    assert r.status_code == 201, r.text
    conforms(r.json(), "InferenceBackendPublic")
    params = ["--speculative-algorithm", "DSPARK", "--speculative-draft-model-path", "/d"]
    values = {"model_path": "/m", "port": "40001", "worker_ip": "10.0.0.5", "model_name": "demo",
              "gpu_count": "1", "gpu_ids": "0"}  # fmt: skip
    state = c.app.state.cluster
    for version, device in [("cpu-custom", []), ("cuda-custom", ["--device", "cuda"])]:
        with state.sessions() as s:
            m = Model(name="demo", backend="specserve-custom", backend_version=version)
            launch = launch_template(s, m)
        spec = build_launch_spec("demo-1", launch, params, {}, values, Path("/tmp/x.log"), [0])
        line = shlex.join(spec.argv)
        assert line.startswith("specserve serve --model-path /m --host 10.0.0.5 --port 40001 "
                               "--served-model-name demo")  # fmt: skip
        assert line.endswith(shlex.join(params)) and all(d in spec.argv for d in device)
        assert launch.framework == version.split("-")[0] and launch.health_check_path == "/health"
