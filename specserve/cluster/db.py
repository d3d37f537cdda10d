"""Database layer: ORM tables, engine and session factory, versioned schema migrations.

SQLite (default, in the data dir) and PostgreSQL are both supported. The schema is
versioned: `MIGRATIONS` is an append-only list applied in order and recorded in the
`schema_migrations` table, each step written with alembic operations.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


def utcnow() -> dt.datetime:
    """Naive UTC timestamp (stored the same way by SQLite and PostgreSQL)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Worker(Base):
    __tablename__ = "workers"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(255), unique=True)
    ip: Mapped[str] = mapped_column(sa.String(255))
    port: Mapped[int] = mapped_column(sa.Integer)
    labels: Mapped[dict] = mapped_column(sa.JSON, default=dict)
    port_range_start: Mapped[int] = mapped_column(sa.Integer)
    port_range_end: Mapped[int] = mapped_column(sa.Integer)
    state: Mapped[str] = mapped_column(sa.String(32), default="ready")
    state_message: Mapped[str] = mapped_column(sa.Text, default="")
    status: Mapped[dict] = mapped_column(sa.JSON, default=dict)
    credential_hash: Mapped[str] = mapped_column(sa.String(128))
    heartbeat_at: Mapped[dt.datetime] = mapped_column(sa.DateTime, default=utcnow)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime, default=utcnow)


class InferenceBackend(Base):
    __tablename__ = "inference_backends"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(255), unique=True)
    description: Mapped[str] = mapped_column(sa.Text, default="")
    builtin: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    default_version: Mapped[str] = mapped_column(sa.String(64))
    versions: Mapped[dict] = mapped_column(sa.JSON)  # version -> schemas.VersionConfig dict
    default_backend_param: Mapped[list] = mapped_column(sa.JSON, default=list)
    default_run_command: Mapped[str] = mapped_column(sa.Text, default="")
    default_entrypoint: Mapped[str] = mapped_column(sa.Text, default="")
    default_env: Mapped[dict] = mapped_column(sa.JSON, default=dict)
    health_check_path: Mapped[str] = mapped_column(sa.String(255), default="/health")
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(sa.DateTime, default=utcnow, onupdate=utcnow)


class Model(Base):
    """A deployment: what to serve, with which backend, how many replicas, where."""

    __tablename__ = "models"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(255), unique=True)
    description: Mapped[str] = mapped_column(sa.Text, default="")
    source: Mapped[str] = mapped_column(sa.String(32))  # local_path | huggingface | model_scope
    local_path: Mapped[str | None] = mapped_column(sa.Text, nullable=True)
    repo_id: Mapped[str | None] = mapped_column(sa.String(255), nullable=True)  # hub id
    replicas: Mapped[int] = mapped_column(sa.Integer, default=1)
    backend: Mapped[str] = mapped_column(sa.String(255))
    backend_version: Mapped[str | None] = mapped_column(sa.String(64), nullable=True)
    backend_parameters: Mapped[list] = mapped_column(sa.JSON, default=list)
    env: Mapped[dict] = mapped_column(sa.JSON, default=dict)
    worker_selector: Mapped[dict] = mapped_column(sa.JSON, default=dict)
    placement: Mapped[str] = mapped_column(sa.String(16), default="spread")
    categories: Mapped[list] = mapped_column(sa.JSON, default=list)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(sa.DateTime, default=utcnow, onupdate=utcnow)


class ModelInstance(Base):
    """One replica of a deployment. Ids are never reused: workers match instances on them."""

    __tablename__ = "model_instances"
    __table_args__ = {"sqlite_autoincrement": True}
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(255), unique=True)
    model_id: Mapped[int] = mapped_column(sa.ForeignKey("models.id"), index=True)
    model_name: Mapped[str] = mapped_column(sa.String(255), index=True)
    worker_id: Mapped[int | None] = mapped_column(sa.Integer, nullable=True, index=True)
    worker_name: Mapped[str | None] = mapped_column(sa.String(255), nullable=True)
    worker_ip: Mapped[str | None] = mapped_column(sa.String(255), nullable=True)
    port: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    gpu_ids: Mapped[list] = mapped_column(sa.JSON, default=list)
    computed_resource: Mapped[dict] = mapped_column(sa.JSON, default=dict)
    state: Mapped[str] = mapped_column(sa.String(32), default="pending")
    state_message: Mapped[str] = mapped_column(sa.Text, default="")
    pid: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    restart_count: Mapped[int] = mapped_column(sa.Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(sa.DateTime, default=utcnow, onupdate=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(255), unique=True)
    description: Mapped[str] = mapped_column(sa.Text, default="")
    access_key: Mapped[str] = mapped_column(sa.String(32), unique=True)
    secret_hash: Mapped[str] = mapped_column(sa.String(128))
    scopes: Mapped[list] = mapped_column(sa.JSON, default=list)  # "*", management, inference
    expires_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime, nullable=True)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(sa.DateTime, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime, default=utcnow)


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(sa.String(255), unique=True)
    password_hash: Mapped[str] = mapped_column(sa.String(255))
    created_at: Mapped[dt.datetime] = mapped_column(sa.DateTime, default=utcnow)


# ----------------------------------------------------------------------------- migrations


def _v1_initial(op: Operations) -> None:
    def ts(name: str, nullable: bool = False) -> sa.Column:
        return sa.Column(name, sa.DateTime, nullable=nullable)

    def pk() -> sa.Column:
        return sa.Column("id", sa.Integer, primary_key=True)

    op.create_table(
        "workers", pk(),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("ip", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("port_range_start", sa.Integer, nullable=False),
        sa.Column("port_range_end", sa.Integer, nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("state_message", sa.Text, nullable=False),
        sa.Column("status", sa.JSON, nullable=False),
        sa.Column("credential_hash", sa.String(128), nullable=False),
        ts("heartbeat_at"), ts("created_at"),
    )  # fmt: skip
    op.create_table(
        "inference_backends", pk(),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("builtin", sa.Boolean, nullable=False),
        sa.Column("default_version", sa.String(64), nullable=False),
        sa.Column("versions", sa.JSON, nullable=False),
        ts("created_at"), ts("updated_at"),
    )  # fmt: skip
    op.create_table(
        "models", pk(),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("local_path", sa.Text, nullable=True),
        sa.Column("repo_id", sa.String(255), nullable=True),
        sa.Column("replicas", sa.Integer, nullable=False),
        sa.Column("backend", sa.String(255), nullable=False),
        sa.Column("backend_version", sa.String(64), nullable=True),
        sa.Column("backend_parameters", sa.JSON, nullable=False),
        sa.Column("env", sa.JSON, nullable=False),
        sa.Column("worker_selector", sa.JSON, nullable=False),
        sa.Column("placement", sa.String(16), nullable=False),
        ts("created_at"), ts("updated_at"),
    )  # fmt: skip
    op.create_table(
        "model_instances", pk(),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("model_id", sa.Integer, sa.ForeignKey("models.id"), nullable=False, index=True),
        sa.Column("model_name", sa.String(255), nullable=False, index=True),
        sa.Column("worker_id", sa.Integer, nullable=True, index=True),
        sa.Column("worker_name", sa.String(255), nullable=True),
        sa.Column("worker_ip", sa.String(255), nullable=True),
        sa.Column("port", sa.Integer, nullable=True),
        sa.Column("gpu_ids", sa.JSON, nullable=False),
        sa.Column("computed_resource", sa.JSON, nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("state_message", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=True),
        sa.Column("restart_count", sa.Integer, nullable=False),
        ts("created_at"), ts("updated_at"),
    )  # fmt: skip
    op.create_table(
        "api_keys", pk(),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("access_key", sa.String(32), nullable=False, unique=True),
        sa.Column("secret_hash", sa.String(128), nullable=False),
        sa.Column("scopes", sa.JSON, nullable=False),
        ts("expires_at", nullable=True), ts("last_used_at", nullable=True), ts("created_at"),
    )  # fmt: skip
    op.create_table(
        "users", pk(),
        sa.Column("username", sa.String(255), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(255), nullable=False),
        ts("created_at"),
    )  # fmt: skip


def _v2_instance_ids_never_reused(op: Operations) -> None:
    # PostgreSQL sequences never hand out an id twice; SQLite reuses a deleted top rowid
    # unless the table is declared AUTOINCREMENT, which needs a rebuilt table.
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table(
        "model_instances", recreate="always", table_kwargs={"sqlite_autoincrement": True}
    ):
        pass


def _v3_gpustack_shapes(op: Operations) -> None:
    """GPUStack's backend fields (per-backend defaults and health check, version configs with
    image_name / run_command / custom_framework), model descriptions and categories, the
    `model_scope` source name, API key descriptions."""
    text, json = sa.Text, sa.JSON
    for table, name, kind, default in [
        ("inference_backends", "default_backend_param", json, "'[]'"),
        ("inference_backends", "default_run_command", text, "''"),
        ("inference_backends", "default_entrypoint", text, "''"),
        ("inference_backends", "default_env", json, "'{}'"),
        ("inference_backends", "health_check_path", sa.String(255), "'/health'"),
        ("models", "description", text, "''"),
        ("models", "categories", json, "'[]'"),
        ("api_keys", "description", text, "''"),
    ]:
        op.add_column(table, sa.Column(name, kind, nullable=False, server_default=sa.text(default)))
    conn = op.get_bind()
    backends = sa.table("inference_backends", sa.column("id"), sa.column("default_version"),
                        sa.column("versions", json), sa.column("health_check_path"))  # fmt: skip
    renamed = {"image": "image_name", "framework": "custom_framework", "command": "run_command"}
    for row in conn.execute(sa.select(backends)).all():
        health = row.versions.get(row.default_version, {}).get("health_check_path", "/health")
        versions = {
            v: {renamed.get(k, k): x for k, x in spec.items() if k != "health_check_path"}
            for v, spec in row.versions.items()
        }
        conn.execute(backends.update().where(backends.c.id == row.id)
                     .values(versions=versions, health_check_path=health))  # fmt: skip
    models = sa.table("models", sa.column("source"))
    conn.execute(
        models.update().where(models.c.source == "modelscope").values(source="model_scope")
    )


# Append-only: (version, description, step). Never edit a released step; add a new one.
MIGRATIONS: list[tuple[int, str, Callable[[Operations], None]]] = [
    (1, "initial schema", _v1_initial),
    (2, "model instance ids are never reused", _v2_instance_ids_never_reused),
    (3, "GPUStack 2.x field names and defaults", _v3_gpustack_shapes),
]

_versions = sa.Table(
    "schema_migrations",
    sa.MetaData(),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("description", sa.String(255), nullable=False),
    sa.Column("applied_at", sa.DateTime, nullable=False),
)


def schema_version(engine: sa.Engine) -> int:
    """The highest applied migration, 0 for an empty database."""
    if not sa.inspect(engine).has_table("schema_migrations"):
        return 0
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.max(_versions.c.version))).scalar() or 0


def migrate(engine: sa.Engine) -> int:
    """Apply every pending migration, each in its own transaction; returns the new version."""
    _versions.create(engine, checkfirst=True)
    current = schema_version(engine)
    for version, description, step in MIGRATIONS:
        if version <= current:
            continue
        with engine.begin() as conn:
            step(Operations(MigrationContext.configure(conn)))
            conn.execute(
                _versions.insert().values(
                    version=version, description=description, applied_at=utcnow()
                )
            )
        current = version
    return current


def make_engine(url: str) -> sa.Engine:
    """An engine for `sqlite:///path` or `postgresql://...` (driven by psycopg 3)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def open_database(url: str) -> sessionmaker:
    """Engine + migrations + a session factory (sessions do not expire objects on commit)."""
    engine = make_engine(url)
    migrate(engine)
    return sessionmaker(engine, expire_on_commit=False)
