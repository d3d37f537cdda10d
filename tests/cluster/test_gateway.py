"""Gateway errors name their cause; a wrong admin password is told apart from no credentials."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from specserve.cluster import db

from .harness import PASSWORD, free_port, items
from .test_store import app_client


def read_whole_request(conn: socket.socket) -> None:
    """Read one HTTP request (headers, then Content-Length bytes of body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return
        body += chunk


@pytest.fixture
def hang_up_port() -> Iterator[int]:
    """A port whose server accepts each connection and closes it without answering."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            read_whole_request(conn)  # unread bytes would make close() send a reset
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


def run_instance_on(url: str, port: int) -> None:
    """Mark the deployment's instance running at 127.0.0.1:`port` (no worker involved)."""
    engine = db.make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.update(db.ModelInstance).values(state="running", worker_ip="127.0.0.1", port=port)
        )
    engine.dispose()


@pytest.mark.parametrize("upstream", ["refused", "hang_up"])
def test_502_names_the_cause(tmp_path: Path, upstream: str, request) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with app_client(tmp_path, url) as c:
        c.auth = ("admin", PASSWORD)
        dep = {"name": "m", "repo_id": "org/m", "backend": "specserve"}
        assert c.post("/v2/models", json=dep).status_code == 201
        key = c.post("/v2/api-keys", json={"name": "k"}).json()["value"]
        c.auth = None
        for _ in range(50):  # the controller creates the instance row
            if items(c.get("/v2/model-instances", auth=("admin", PASSWORD))):
                break
        port = free_port() if upstream == "refused" else request.getfixturevalue("hang_up_port")
        run_instance_on(url, port)
        r = c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"model": "m", "messages": []})  # fmt: skip
    assert r.status_code == 502
    message = r.json()["error"]["message"]
    if upstream == "refused":
        assert "ConnectError: " in message and "refused" in message.lower()
    else:
        assert "RemoteProtocolError: Server disconnected" in message


def test_wrong_admin_password_is_named(tmp_path: Path) -> None:
    with app_client(tmp_path, f"sqlite:///{tmp_path / 'store.db'}") as c:
        r = c.get("/v2/models", auth=("admin", "wrong"))
        assert r.status_code == 401
        assert r.json()["error"]["message"] == "wrong username or password"
        r = c.get("/v2/models")
        assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
