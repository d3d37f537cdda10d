"""Record what GPUStack 2.3's own client sends and what it accepts back (run by hand).

    python -m venv /tmp/gsvenv && /tmp/gsvenv/bin/pip install gpustack==2.3.0
    /tmp/gsvenv/bin/python tests/cluster/gpustack_2_3/record.py [--live http://127.0.0.1:8080]

`gpustack` cannot live in the test environment (it pins fastapi < 0.137 and SQLAlchemy
< 2.1 below ours), so this script writes, next to itself:
  * requests.json: the bodies `gpustack.client.ClientSet` sends (`model_dump_json()` of
    GPUStack's InferenceBackendCreate, ModelCreate and ApiKeyCreate), and a from-yaml body;
  * schemas.json: the JSON Schemas of the response models the client parses
    (InferenceBackendPublic, ModelPublic, ApiKeyPublic and the paginated lists).
`tests/cluster/test_gpustack_compat.py` replays the requests and validates the responses.
With `--live URL` (admin password `pw`) it also drives a running `specserve cluster` with
the real ClientSet: create a backend and a model, list instances, backends, models, workers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gpustack
from gpustack.schemas.api_keys import ApiKeyCreate, ApiKeyPublic
from gpustack.schemas.inference_backend import (
    InferenceBackendCreate,
    InferenceBackendPublic,
    InferenceBackendsPublic,
    VersionConfig,
    VersionConfigDict,
)
from gpustack.schemas.models import ModelCreate, ModelInstancesPublic, ModelPublic, ModelsPublic
from gpustack.schemas.workers import WorkersPublic

HERE = Path(__file__).parent
RUN_COMMAND = ("specserve serve --model-path {{model_path}} --host {{worker_ip}} --port {{port}} "
               "--served-model-name {{model_name}}")  # fmt: skip
YAML = f"""backend_name: specserve-yaml-custom
default_version: cpu-custom
health_check_path: /health
default_backend_param: ["--speculative-algorithm", "DSPARK"]
version_configs:
  cpu-custom:
    image_name: specserve:cpu
    run_command: "{RUN_COMMAND}"
    custom_framework: cpu
"""


def bodies() -> dict:
    backend = InferenceBackendCreate(
        backend_name="specserve-custom",
        version_configs=VersionConfigDict(root={
            "cpu-custom": VersionConfig(image_name="specserve:cpu", run_command=RUN_COMMAND,
                                        custom_framework="cpu"),
            "cuda-custom": VersionConfig(image_name="specserve:cuda", run_command=RUN_COMMAND,
                                         custom_framework="cuda", env={"OMP_NUM_THREADS": "4"}),
        }),
        default_version="cpu-custom",
        default_backend_param=["--speculative-algorithm", "DSPARK"],
        health_check_path="/health",
        description="specserve with DSpark",
    )  # fmt: skip
    model = ModelCreate(
        name="demo", source="local_path", local_path="/models/demo/target",
        backend="specserve-custom", backend_version="cpu-custom", replicas=0, categories=["llm"],
        backend_parameters=["--speculative-draft-model-path", "/models/demo/dspark"],
    )  # fmt: skip
    hf = ModelCreate(name="qwen", source="huggingface", huggingface_repo_id="Qwen/Qwen3-0.6B",
                     backend="specserve-custom", replicas=0)  # fmt: skip
    key = ApiKeyCreate(name="app", scope=["inference"], expires_in=3600)
    return {
        "gpustack_version": gpustack.__version__,
        "backend": json.loads(backend.model_dump_json()),
        "model": json.loads(model.model_dump_json()),
        "model_huggingface": json.loads(hf.model_dump_json()),
        "api_key": json.loads(key.model_dump_json()),
        "backend_from_yaml": {"content": YAML},
    }


def schemas() -> dict:
    models = {"InferenceBackendPublic": InferenceBackendPublic, "ModelPublic": ModelPublic,
              "ApiKeyPublic": ApiKeyPublic, "InferenceBackendsPublic": InferenceBackendsPublic,
              "ModelsPublic": ModelsPublic, "ModelInstancesPublic": ModelInstancesPublic,
              "WorkersPublic": WorkersPublic}  # fmt: skip
    return {name: m.model_json_schema(mode="validation") for name, m in models.items()}


def live(url: str) -> None:
    from gpustack.client import ClientSet

    cs = ClientSet(base_url=url, username="admin", password="pw", enable_cache=False)
    b = bodies()
    backend = cs.inference_backends.create(InferenceBackendCreate.model_validate(b["backend"]))
    print("backend:", backend.backend_name, sorted(backend.version_configs.root))
    model = cs.models.create(ModelCreate.model_validate(b["model"]))
    print("model:", model.id, model.name, model.backend, model.source)
    for kind in ("model_instances", "inference_backends", "models", "workers"):
        page = getattr(cs, kind).list(use_cache=False)
        print(f"{kind}: {len(page.items)} items, pagination {page.pagination}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--live", help="a running specserve cluster to drive with ClientSet")
    args = ap.parse_args()
    (HERE / "requests.json").write_text(json.dumps(bodies(), indent=1, sort_keys=True) + "\n")
    (HERE / "schemas.json").write_text(json.dumps(schemas(), indent=1, sort_keys=True) + "\n")
    if args.live:
        live(args.live)


if __name__ == "__main__":
    main()
