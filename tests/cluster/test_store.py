"""The store and REST API against SQLite and PostgreSQL (same tests, parametrised `db_url`)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient

from specserve.cluster import db
from specserve.cluster.server import ServerConfig, create_app

from .harness import PASSWORD, TOKEN, wait_for

SEED_DSPARK = {  # the seed's GPUStack backend, as written there
    "name": "dspark",
    "entrypoint": "sglang serve",
    "command": "--model-path {{model_path}} --host {{worker_ip}} --port {{port}}",
    "framework": "CUDA",
}
STATUS = {"cpu_count": 4, "cpu_percent": 1.0, "memory_total": 16 << 30,
          "memory_available": 8 << 30, "gpus": []}  # fmt: skip


def app_client(tmp: Path, url: str, heartbeat_timeout: float = 60.0) -> TestClient:
    config = ServerConfig(data_dir=tmp / "data", database_url=url, bootstrap_password=PASSWORD,
                          token=TOKEN, heartbeat_timeout=heartbeat_timeout, schedule_interval=0.1)  # fmt: skip
    return TestClient(create_app(config))


class Bearer:
    """Per-request bearer auth (overrides the client's admin basic auth)."""

    def __init__(self, token: str) -> None:
        self.token = token

    def __call__(self, request):  # noqa: ANN001, ANN204 - httpx function auth
        request.headers["Authorization"] = f"Bearer {self.token}"
        return request


def register(client: TestClient, name: str, token: str = TOKEN) -> tuple[int, int, Bearer]:
    body = {"name": name, "ip": "127.0.0.1", "port": 1, "port_range_start": 45000,
            "port_range_end": 45001, "status": STATUS}  # fmt: skip
    r = client.post("/v2/workers/register", json=body, auth=Bearer(token))
    data = r.json()
    return r.status_code, data.get("id", 0), Bearer(data.get("credential", ""))


def test_migrations_versioned_and_match_models(db_url: str) -> None:
    engine = db.make_engine(db_url)
    assert db.schema_version(engine) == 0
    assert db.migrate(engine) == db.MIGRATIONS[-1][0]
    assert db.migrate(engine) == db.MIGRATIONS[-1][0]  # idempotent
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), db.Base.metadata)
    diffs = [d for d in diffs if not (d[0] == "remove_table" and d[1].name == "schema_migrations")]
    assert diffs == [], "ORM models and migrations disagree; add a migration"
    engine.dispose()


def test_backends_models_keys_and_errors(tmp_path: Path, db_url: str) -> None:
    with app_client(tmp_path, db_url) as c:
        r = c.get("/v2/models")
        assert r.status_code == 401 and r.json()["error"]["message"]
        assert c.get("/v2/models", auth=("admin", "wrong")).status_code == 401
        c.auth = ("admin", PASSWORD)

        builtin = c.get("/v2/inference-backends/specserve").json()
        version = builtin["version_configs"][builtin["default_version"]]
        assert (
            version["entrypoint"].startswith(sys.executable)
            and "-m specserve serve" in version["entrypoint"]
        )
        assert "--served-model-name {{model_name}}" in version["run_command"]
        assert builtin["health_check_path"] == "/health" and builtin["is_built_in"]

        r = c.post("/v2/inference-backends", json=SEED_DSPARK)
        assert r.status_code == 201, r.text
        assert r.json()["version_configs"]["default"]["custom_framework"] == "cuda"
        r = c.post("/v2/inference-backends", json=SEED_DSPARK)
        assert r.status_code == 409 and "already exists" in r.json()["error"]["message"]
        # as in GPUStack, an unknown placeholder is kept verbatim (with a warning in the log)
        r = c.post(
            "/v2/inference-backends", json={**SEED_DSPARK, "name": "x", "command": "--p {{nope}}"}
        )
        assert r.status_code == 201 and r.json()["version_configs"]["default"]["run_command"] == (
            "--p {{nope}}"
        )
        r = c.post("/v2/inference-backends", json={**SEED_DSPARK, "name": "y", "framework": "tpu"})
        assert r.status_code == 400 and "custom_framework" in r.json()["error"]["message"]
        assert c.delete("/v2/inference-backends/specserve").status_code == 400

        dep = {"name": "ds", "repo_id": "deepseek-ai/DeepSeek-V4-Flash", "backend": "dspark",
               "backend_parameters": "--tp-size 8 --speculative-algorithm DSPARK", "replicas": 0}  # fmt: skip
        r = c.post("/v2/models", json=dep)
        assert r.status_code == 201, r.text
        assert r.json()["source"] == "huggingface"
        assert r.json()["backend_parameters"] == [
            "--tp-size",
            "8",
            "--speculative-algorithm",
            "DSPARK",
        ]
        assert c.post("/v2/models", json=dep).status_code == 409
        r = c.post("/v2/models", json={**dep, "name": "y", "backend": "missing"})
        assert r.status_code == 400 and "missing" in r.json()["error"]["message"]
        assert c.post("/v2/models", json={**dep, "name": "bad name!"}).status_code == 400
        assert c.post("/v2/models", json={"name": "z", "source": "local_path"}).status_code == 400
        assert c.delete("/v2/inference-backends/dspark").status_code == 409  # in use
        assert c.patch("/v2/models/ds", json={"replicas": 3}).json()["replicas"] == 3
        assert c.get("/v2/models/404").status_code == 404

        created = c.post("/v2/api-keys", json={"name": "k1", "scope": ["inference"]}).json()
        value = created["value"]
        assert value.startswith("gpustack_") and created["scope"] == ["inference"]
        assert c.get("/v2/api-keys").json()["items"][0]["value"] is None
        engine = db.make_engine(db_url)
        with engine.connect() as conn:
            stored = conn.execute(sa.select(db.ApiKey.secret_hash)).scalar()
        engine.dispose()
        assert value.split("_", 2)[2] not in stored
        c.auth = None
        key = {"Authorization": f"Bearer {value}"}
        assert c.get("/v1/models", headers=key).status_code == 200
        assert c.get("/v2/models", headers=key).status_code == 401  # inference scope only
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {value}x"}).status_code == 401


def test_workers_scheduling_and_liveness(tmp_path: Path, db_url: str) -> None:
    with app_client(tmp_path, db_url, heartbeat_timeout=1.5) as c:
        assert register(c, "w1", token="wrong")[0] == 401
        code, wid, cred = register(c, "w1")
        assert code == 200
        assert c.post(f"/v2/workers/{wid}/heartbeat", json=STATUS,
                      auth=Bearer("nope")).status_code == 401  # fmt: skip
        c.auth = ("admin", PASSWORD)
        c.post("/v2/inference-backends", json={**SEED_DSPARK, "framework": "cpu"})
        dep = {"name": "m", "repo_id": "org/m", "backend": "dspark", "replicas": 2}
        assert c.post("/v2/models", json=dep).status_code == 201

        def assigned() -> list | None:
            a = c.post(f"/v2/workers/{wid}/heartbeat", json=STATUS, auth=cred).json()
            return a if len(a) == 2 else None

        assignments = wait_for(assigned, 10, "two assignments")
        ports = {a["instance"]["port"] for a in assignments}
        assert ports == {45000, 45001}  # distinct ports from the worker's range
        assert assignments[0]["launch"]["entrypoint"] == "sglang serve"
        iid = assignments[0]["instance"]["id"]
        r = c.put(f"/v2/workers/{wid}/instances/{iid}/state", auth=cred,
                  json={"state": "running", "pid": 42})  # fmt: skip
        assert r.status_code == 200
        assert c.get(f"/v2/model-instances/{iid}").json()["state"] == "running"
        assert c.get("/v2/models/m").json()["ready_replicas"] == 1

        _, wid2, cred2 = register(c, "w2")
        r = c.put(f"/v2/workers/{wid2}/instances/{iid}/state", auth=cred2,
                  json={"state": "running"})  # fmt: skip
        assert r.status_code == 409  # not w2's instance

        # a third replica does not fit: w1's two ports are taken, w2 has its own range
        c.patch("/v2/models/m", json={"replicas": 3})
        # w1 stops heartbeating: not ready, its instances go back to the scheduler
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            c.post(f"/v2/workers/{wid2}/heartbeat", json=STATUS, auth=cred2)
            if c.get("/v2/workers/w1").json()["state"] == "not_ready":
                break
            time.sleep(0.2)
        assert c.get("/v2/workers/w1").json()["state"] == "not_ready"
        insts = c.get("/v2/model-instances", params={"model": "m"}).json()["items"]
        assert all(i["worker_name"] != "w1" for i in insts)
        on_w2 = [i for i in insts if i["worker_name"] == "w2"]
        assert len(on_w2) == 2
        pending = [i for i in insts if i["state"] == "pending"]
        assert len(pending) == 1 and "w1: not ready" in pending[0]["state_message"]
        assert "w2: no free port" in pending[0]["state_message"]


def test_v3_migration_converts_existing_rows(db_url: str, monkeypatch) -> None:
    """A database written before GPUStack's shapes keeps its backends and hub models."""
    engine = db.make_engine(db_url)
    monkeypatch.setattr(db, "MIGRATIONS", db.MIGRATIONS[:2])
    db.migrate(engine)
    monkeypatch.undo()
    now = db.utcnow()
    old = {"entrypoint": "sglang serve", "image": None, "framework": "cuda", "env": {},
           "command": "--port {{port}}", "health_check_path": "/healthz"}  # fmt: skip
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO inference_backends (name, description, builtin, default_version, "
            "versions, created_at, updated_at) VALUES ('dspark', '', false, 'v1', :v, :t, :t)"),
            {"v": json.dumps({"v1": old}), "t": now})  # fmt: skip
        conn.execute(sa.text(
            "INSERT INTO models (name, source, repo_id, replicas, backend, backend_parameters, "
            "env, worker_selector, placement, created_at, updated_at) VALUES ('m', 'modelscope', "
            "'org/m', 0, 'dspark', '[]', '{}', '{}', 'spread', :t, :t)"), {"t": now})  # fmt: skip
    assert db.migrate(engine) == db.MIGRATIONS[-1][0]
    with sa.orm.Session(engine) as s:
        b = s.scalar(sa.select(db.InferenceBackend))
        assert b.versions == {"v1": {"entrypoint": "sglang serve", "image_name": None, "env": {},
                                     "custom_framework": "cuda", "run_command": "--port {{port}}"}}  # fmt: skip
        assert b.health_check_path == "/healthz" and b.default_backend_param == []
        assert s.scalar(sa.select(db.Model.source)) == "model_scope"
    engine.dispose()
