"""`specserve cluster ...`: run a server or worker, and a thin client over the REST API."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from specserve.cli import CLIError

DEFAULT_DATA_DIR = Path(os.path.expanduser("~/.specserve/cluster"))


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("cluster", help="GPUStack-style control plane")
    sub = p.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND")

    s = sub.add_parser("start", help="run the server (and optionally a worker in it)")
    s.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)"
    )
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    s.add_argument("--database-url", help="sqlite:///PATH or postgresql://... (default: SQLite)")
    s.add_argument("--bootstrap-password", help="admin password on first start")
    s.add_argument("--token", help="worker registration token (default: generated)")
    s.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=30.0,
        help="seconds without a heartbeat before a worker is not ready and its instances move "
        "(default 30)",
    )
    s.add_argument(
        "--schedule-interval",
        type=float,
        default=2.0,
        help="seconds between scheduler passes (default 2; changes trigger one at once)",
    )
    s.add_argument("--enable-worker", action="store_true", help="also run a worker here")
    _worker_flags(s)
    s.set_defaults(func=cmd_start)

    w = sub.add_parser("worker", help="run a worker that joins a server")
    w.add_argument("--server-url", required=True)
    w.add_argument("--token", required=True)
    w.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR / "worker")
    _worker_flags(w)
    w.set_defaults(func=cmd_worker)

    b = _client(sub, "backend", "inference backends", ["list", "show", "create", "delete"])
    b.add_argument("name", nargs="?", help="backend name (show, delete)")
    b.add_argument("-f", "--file", type=Path, help="YAML/JSON definition (create)")

    d = _client(sub, "deploy", "model deployments", ["list", "show", "create", "scale", "delete"])
    d.add_argument("name", nargs="?")
    d.add_argument("replicas_arg", nargs="?", type=int, metavar="REPLICAS", help="for scale")
    d.add_argument("--model-path", help="local path on the workers")
    d.add_argument("--hf-repo", help="Hugging Face repo id")
    d.add_argument("--modelscope-repo", help="ModelScope model id")
    d.add_argument("--backend", default="specserve")
    d.add_argument("--backend-version")
    d.add_argument("--backend-parameters", default="", help='e.g. "--tp-size 8"')
    d.add_argument("--replicas", type=int, default=1)
    d.add_argument("--env", action="append", default=[], metavar="K=V")
    d.add_argument("--selector", action="append", default=[], metavar="LABEL=VALUE")
    d.add_argument("--placement", choices=["spread", "binpack"], default="spread")

    i = _client(sub, "instances", "model instances", ["list", "logs", "restart"])
    i.add_argument("ref", nargs="?", help="instance id or name (logs, restart)")
    i.add_argument("--model", help="only this deployment (list)")
    i.add_argument("--follow", action="store_true")
    i.add_argument("--tail", type=int, default=0)

    wk = _client(sub, "workers", "workers", ["list", "delete"])
    wk.add_argument("name", nargs="?")

    k = _client(sub, "api-key", "API keys", ["list", "create", "delete"])
    k.add_argument("name", nargs="?")
    k.add_argument(
        "--scope",
        action="append",
        choices=["inference", "management", "*"],
        help="what the key may do (repeatable; default inference; * = everything)",
    )
    k.add_argument("--expires-in-days", type=int)


def _worker_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worker-name", help="default: host name")
    p.add_argument(
        "--worker-ip",
        help="address the server and gateway reach this worker on; instances listen there "
        "(default: the local address that routes to the server)",
    )
    p.add_argument(
        "--worker-host",
        help="address the worker API listens on (default: --worker-ip only; 0.0.0.0: all)",
    )
    p.add_argument("--worker-port", type=int, default=10150, help="worker API port")
    p.add_argument("--service-port-range", default="40000-40063", help="ports for instances")
    p.add_argument("--label", action="append", default=[], metavar="K=V", help="worker label")
    p.add_argument(
        "--heartbeat-interval",
        type=float,
        default=5.0,
        help="seconds between worker heartbeats and health checks (default 5)",
    )
    p.add_argument(
        "--restart-backoff",
        type=float,
        default=10.0,
        help="seconds before the first restart of a crashed instance, doubled per crash "
        "up to 300 (default 10)",
    )


def _client(sub: argparse._SubParsersAction, name: str, what: str, actions: list[str]):
    p = sub.add_parser(name, help=f"manage {what}")
    p.add_argument("action", choices=actions)
    p.add_argument(
        "--server-url", default=os.environ.get("SPECSERVE_SERVER_URL", "http://127.0.0.1:8080")
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("SPECSERVE_API_KEY"),
        help="management API key (or env SPECSERVE_API_KEY)",
    )
    p.add_argument(
        "--password",
        default=os.environ.get("SPECSERVE_PASSWORD"),
        help="admin password (or env SPECSERVE_PASSWORD)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_client, resource=name)
    return p


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _port_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split("-"))
    except ValueError:
        raise CLIError(f"--service-port-range expects LOW-HIGH, got {text!r}") from None
    return lo, hi


def _worker_config(args: argparse.Namespace, server_url: str, token: str, data_dir: Path):
    import socket

    from specserve.cluster.worker import WorkerConfig

    try:
        return WorkerConfig(
            server_url=server_url,
            token=token,
            data_dir=data_dir,
            name=args.worker_name or socket.gethostname(),
            ip=args.worker_ip,
            host=args.worker_host,
            port=args.worker_port,
            port_range=_port_range(args.service_port_range),
            labels=_pairs(args.label, "--label"),
            heartbeat_interval=args.heartbeat_interval,
            restart_backoff=args.restart_backoff,
        )
    except ValueError as e:
        raise CLIError(str(e)) from None


def _setup_logging() -> None:
    import logging

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat otherwise


def cmd_start(args: argparse.Namespace) -> int:
    import asyncio

    from specserve.cluster.server import ServerConfig, create_app
    from specserve.cluster.service import http_server, serve_until_signal
    from specserve.cluster.worker import Worker, worker_app

    _setup_logging()
    try:
        config = ServerConfig(
            data_dir=args.data_dir,
            host=args.host,
            port=args.port,
            database_url=args.database_url,
            bootstrap_password=args.bootstrap_password,
            token=args.token,
            heartbeat_timeout=args.heartbeat_timeout,
            schedule_interval=args.schedule_interval,
        )
        app = create_app(config)
    except ValueError as e:
        raise CLIError(str(e)) from None
    except Exception as e:  # database unreachable, bad migration, ...
        raise CLIError(f"cannot start: {type(e).__name__}: {e}") from None
    state = app.state.cluster
    print(f"specserve cluster: http://{args.host}:{args.port}  data: {config.data_dir}", flush=True)
    print(f"worker token: {config.data_dir / 'token'}", flush=True)
    servers = [http_server(app, args.host, args.port)]
    loops = []
    if args.enable_worker:
        wc = _worker_config(
            args, f"http://127.0.0.1:{args.port}", state.token, config.data_dir / "worker"
        )
        wc.data_dir.mkdir(parents=True, exist_ok=True)
        worker = Worker(wc)
        servers.append(http_server(worker_app(worker), worker.host, wc.port))
        loops.append(worker.run())
    asyncio.run(serve_until_signal(servers, loops))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import asyncio

    from specserve.cluster.worker import run_worker

    _setup_logging()
    asyncio.run(run_worker(_worker_config(args, args.server_url, args.token, args.data_dir)))
    return 0


# ----------------------------------------------------------------------------- client


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        import httpx

        headers, auth = {}, None
        if args.api_key:
            headers["Authorization"] = f"Bearer {args.api_key}"
            self.credential_flag = "--api-key or SPECSERVE_API_KEY"
        elif args.password:
            auth = ("admin", args.password)
            self.credential_flag = "--password or SPECSERVE_PASSWORD"
        else:
            raise CLIError("give --api-key (or SPECSERVE_API_KEY) or --password")
        self.http = httpx.Client(
            base_url=args.server_url.rstrip("/"), headers=headers, auth=auth, timeout=30.0
        )

    def call(self, method: str, path: str, **kw) -> object:
        import httpx

        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise CLIError(f"cannot reach {self.http.base_url}: {e}") from None
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text[:300]
            if r.status_code == 401:
                message += f" (check {self.credential_flag})"
            raise CLIError(f"{r.status_code}: {message}")
        return r.json() if r.content else None

    def items(self, path: str, **params: object) -> list:
        """Every row of a GPUStack-style paginated list."""
        return self.call("GET", path, params={**params, "page": -1})["items"]


def _need(value: object, what: str) -> object:
    if value is None:
        raise CLIError(f"this action needs {what}")
    return value


def cmd_client(args: argparse.Namespace) -> int:
    c = Client(args)
    out = {
        "backend": _backend,
        "deploy": _deploy,
        "instances": _instances,
        "workers": _workers,
        "api-key": _api_key,
    }[args.resource](c, args)
    if out is None:
        return 0
    if args.json or not isinstance(out, list):
        print(json.dumps(out, indent=2, default=str))
    else:
        _table(out, COLUMNS[args.resource])
    return 0


COLUMNS = {
    "backend": ["id", "backend_name", "default_version", "is_built_in", "description"],
    "deploy": ["id", "name", "backend", "replicas", "ready_replicas", "source"],
    "instances": ["id", "name", "state", "worker_name", "port", "restart_count", "state_message"],
    "workers": ["id", "name", "ip", "state", "labels", "heartbeat_time"],
    "api-key": ["id", "name", "access_key", "scope", "expires_at", "last_used_at"],
}


def _table(rows: list[dict], columns: list[str]) -> None:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    for row in [[c.upper() for c in columns], *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _backend(c: Client, a: argparse.Namespace) -> object:
    if a.action == "list":
        return c.items("/v2/inference-backends")
    if a.action == "create":
        import yaml

        path = _need(a.file, "-f FILE")
        try:
            docs = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise CLIError(f"cannot read {path}: {e}") from None
        docs = docs if isinstance(docs, list) else [docs]
        return [c.call("POST", "/v2/inference-backends", json=d) for d in docs]
    name = _need(a.name, "a backend name")
    if a.action == "show":
        return c.call("GET", f"/v2/inference-backends/{name}")
    return c.call("DELETE", f"/v2/inference-backends/{name}")


def _deploy(c: Client, a: argparse.Namespace) -> object:
    if a.action == "list":
        return c.items("/v2/models")
    name = _need(a.name, "a deployment name")
    if a.action == "show":
        return c.call("GET", f"/v2/models/{name}")
    if a.action == "delete":
        return c.call("DELETE", f"/v2/models/{name}")
    if a.action == "scale":
        replicas = _need(a.replicas_arg, "REPLICAS")
        return c.call("PATCH", f"/v2/models/{name}", json={"replicas": replicas})
    sources = [
        ("local_path", a.model_path),
        ("huggingface", a.hf_repo),
        ("model_scope", a.modelscope_repo),
    ]
    given = [(s, v) for s, v in sources if v]
    if len(given) != 1:
        raise CLIError("give exactly one of --model-path, --hf-repo, --modelscope-repo")
    source, value = given[0]
    body = {
        "name": name,
        "source": source,
        "replicas": a.replicas,
        "backend": a.backend,
        "backend_version": a.backend_version,
        "backend_parameters": a.backend_parameters,
        "env": _pairs(a.env, "--env"),
        "worker_selector": _pairs(a.selector, "--selector"),
        "placement_strategy": a.placement,
        {"local_path": "local_path", "huggingface": "huggingface_repo_id",
         "model_scope": "model_scope_model_id"}[source]: value,
    }  # fmt: skip
    return c.call("POST", "/v2/models", json=body)


def _instances(c: Client, a: argparse.Namespace) -> object:
    if a.action == "list":
        return c.items("/v2/model-instances", **({"model": a.model} if a.model else {}))
    ref = _need(a.ref, "an instance id or name")
    if a.action == "restart":
        return c.call("DELETE", f"/v2/model-instances/{ref}")
    params = {"follow": str(a.follow).lower(), "tail": a.tail}
    with c.http.stream("GET", f"/v2/model-instances/{ref}/logs", params=params, timeout=None) as r:
        if r.status_code >= 400:
            r.read()
            raise CLIError(f"{r.status_code}: {r.text[:300]}")
        for chunk in r.iter_raw():
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
    return None


def _workers(c: Client, a: argparse.Namespace) -> object:
    if a.action == "list":
        return c.items("/v2/workers")
    return c.call("DELETE", f"/v2/workers/{_need(a.name, 'a worker name')}")


def _api_key(c: Client, a: argparse.Namespace) -> object:
    if a.action == "list":
        return c.items("/v2/api-keys")
    name = _need(a.name, "a key name")
    if a.action == "delete":
        return c.call("DELETE", f"/v2/api-keys/{name}")
    days = a.expires_in_days
    body = {"name": name, "scope": a.scope or ["inference"], "expires_in": days and days * 86400}
    out = c.call("POST", "/v2/api-keys", json=body)
    print("the key is shown once; store it now:", file=sys.stderr)
    return out
