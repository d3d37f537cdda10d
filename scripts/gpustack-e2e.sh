#!/usr/bin/env bash
# Real GPUStack 2.3 on this one machine, serving the demo bundle through the specserve backend
# from deploy/gpustack/, with DSpark. Run by hand as root (not part of `make test`):
#
#   sudo scripts/gpustack-e2e.sh            # WORK=/tmp/... KEEP=1 keeps the work dir
#
# It follows the findings of the trial run in issue 19: PostgreSQL from an `initdb` data dir
# on a spare port; stub gguf-parser and fastfetch-bin so the worker starts offline; dockerd
# started by hand (--iptables=false --bridge=none) with a runc wrapper as default runtime that
# drops what root lacks here (CAP_SYS_RESOURCE: oom_score_adj, privileged capabilities); a
# debootstrap base image (no registry) as pause image and as the base of specserve:cpu.
# Exits non-zero on any failure and stops everything it started, by PID.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-$(mktemp -d /tmp/gpustack-e2e.XXXXXX)}
GPUSTACK_VERSION=2.3.0
PORT=${PORT:-18180}
PG_PORT=${PG_PORT:-18181}
PASSWORD=${PASSWORD:-e2e-Password-1}
SUITE=${SUITE:-bookworm}   # Debian release of the base image (python3 3.11)
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
WHEELS=${WHEELS:-/opt/wheels}   # a local torch CPU wheel, used when the PyTorch index is unreachable
URL="http://127.0.0.1:$PORT"
PIDS=()

log() { echo "[$(date +%T) +${SECONDS}s] $*"; }
die() { echo "gpustack-e2e: FAIL: $*" >&2; exit 1; }

cleanup() {
  local rc=$?
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    local pid=${PIDS[i]}
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  [ -n "${KEEP:-}" ] || rm -rf "$WORK/rootfs" "$WORK/context"
  log "stopped ${#PIDS[@]} processes; logs in $WORK (exit $rc)"
}
trap cleanup EXIT

wait_for() {  # wait_for SECONDS WHAT COMMAND...
  local limit=$1 what=$2; shift 2
  for _ in $(seq "$limit"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  die "timed out after ${limit}s waiting for $what"
}

[ "$(id -u)" -eq 0 ] || die "run as root (dockerd, PostgreSQL as user postgres, debootstrap)"
mkdir -p "$WORK" && chmod 755 "$WORK"
log "work dir $WORK"

# --- system packages ---------------------------------------------------------------------
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  log "apt-get install ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- GPUStack in its own venv (it pins fastapi/SQLAlchemy below specserve's) -------------
VENV=${GPUSTACK_VENV:-$WORK/venv}
if [ ! -x "$VENV/bin/gpustack" ]; then
  log "pip install gpustack==$GPUSTACK_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "gpustack==$GPUSTACK_VERSION"
fi
[ -x "$VENV/bin/fastfetch" ] || "$VENV/bin/pip" install --quiet fastfetch-bin
BIN=$("$VENV/bin/python" -c 'import gpustack.third_party as t; print(list(t.__path__)[0])')/bin
mkdir -p "$BIN/gguf-parser" "$BIN/fastfetch"
printf '#!/bin/sh\necho "{}"\n' > "$BIN/gguf-parser/gguf-parser"   # GGUF only; unused here
cp "$VENV/bin/fastfetch" "$BIN/fastfetch/fastfetch"   # from fastfetch-bin
chmod +x "$BIN/gguf-parser/gguf-parser" "$BIN/fastfetch/fastfetch"
echo '{"gguf-parser": "v0.26.4", "fastfetch": "2.25.0.1"}' > "$BIN/versions.json"

# --- PostgreSQL ----------------------------------------------------------------------------
PGBIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")
rm -rf "$WORK/pg" && mkdir -p "$WORK/pg" && chown postgres "$WORK/pg"
runuser -u postgres -- "$PGBIN/initdb" -D "$WORK/pg/data" -A trust -U postgres --no-sync >/dev/null
runuser -u postgres -- "$PGBIN/postgres" -D "$WORK/pg/data" -p "$PG_PORT" -k "$WORK/pg" \
  -c listen_addresses=127.0.0.1 > "$WORK/postgres.log" 2>&1 &
PIDS+=($!)
wait_for 60 PostgreSQL runuser -u postgres -- "$PGBIN/pg_isready" -h 127.0.0.1 -p "$PG_PORT"
runuser -u postgres -- "$PGBIN/createdb" -h 127.0.0.1 -p "$PG_PORT" gpustack
log "PostgreSQL on $PG_PORT"

# --- dockerd with a runtime that fits this VM ------------------------------------------------
REAL_RUNC=$(command -v runc) || die "runc not found (docker.io installs it)"
cat > "$WORK/runc-fit" <<PY
#!/usr/bin/env python3
"""runc, minus what root lacks in this VM: oom_score_adj and capabilities not in our bounding set."""
import json, os, sys
args = sys.argv[1:]
if "--bundle" in args and any(a in ("create", "run") for a in args):
    path = os.path.join(args[args.index("--bundle") + 1], "config.json")
    spec = json.load(open(path))
    spec.get("process", {}).pop("oomScoreAdj", None)
    bound = int(next(l for l in open("/proc/self/status") if l.startswith("CapBnd")).split()[1], 16)
    names = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
             "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
             "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
             "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
             "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
             "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
             "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
             "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND",
             "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE"]
    have = {n for i, n in enumerate(names) if bound >> i & 1}
    caps = spec.get("process", {}).get("capabilities", {})
    for kind in caps:
        caps[kind] = [c for c in caps[kind] if c in have]
    json.dump(spec, open(path, "w"))
os.execv("$REAL_RUNC", ["runc", *args])
PY
chmod +x "$WORK/runc-fit"
cat > "$WORK/daemon.json" <<JSON
{"runtimes": {"fit": {"path": "$WORK/runc-fit"}}, "default-runtime": "fit"}
JSON
export DOCKER_HOST="unix://$WORK/docker.sock"
dockerd --iptables=false --bridge=none --config-file "$WORK/daemon.json" --host "$DOCKER_HOST" \
  --data-root "$WORK/docker" --exec-root "$WORK/docker-exec" --pidfile "$WORK/docker.pid" \
  > "$WORK/dockerd.log" 2>&1 &
PIDS+=($!)
wait_for 60 dockerd docker info
log "dockerd at $DOCKER_HOST"

# --- images: a debootstrap base (pause image, and the base of specserve:cpu) -----------------
if [ ! -x "$WORK/rootfs/usr/bin/python3" ]; then
  log "debootstrap $SUITE (minbase + python3)"
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" \
    "$WORK/rootfs" > "$WORK/debootstrap.log" 2>&1 || die "debootstrap failed, see $WORK/debootstrap.log"
fi
if ! docker image inspect "specserve-base:$SUITE" >/dev/null 2>&1; then
  # this host's CA bundle, so that pip in the image trusts what the host trusts (TLS proxies)
  cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
  tar -C "$WORK/rootfs" -c . | docker import - "specserve-base:$SUITE" >/dev/null
fi
# the pause container needs a command that waits; an imported image has none
printf 'FROM specserve-base:%s\nCMD ["sleep", "infinity"]\n' "$SUITE" \
  | docker build -q -t "specserve-pause:$SUITE" - >/dev/null
export GPUSTACK_RUNTIME_DOCKER_PAUSE_IMAGE="specserve-pause:$SUITE"
log "building specserve:cpu (deploy/gpustack/Dockerfile on specserve-base:$SUITE)"
build_args=(--build-arg "BASE=specserve-base:$SUITE" --build-arg "TORCH_INDEX=$TORCH_INDEX")
if ! curl -sS --fail-with-body -m 10 -o /dev/null "$TORCH_INDEX/torch/"; then
  wheel=$(ls "$WHEELS"/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1) \
    || die "$TORCH_INDEX unreachable and no torch CPU wheel in $WHEELS"
  mkdir -p "$WORK/index/torch" && cp "$wheel" "$WORK/index/torch/"
  python3 -m http.server --bind 127.0.0.1 --directory "$WORK/index" 18189 > "$WORK/index.log" 2>&1 &
  PIDS+=($!)
  wait_for 30 "the local torch index" curl -sS --fail-with-body -o /dev/null http://127.0.0.1:18189/torch/
  build_args=(--build-arg "BASE=specserve-base:$SUITE" --build-arg "TORCH_INDEX=http://127.0.0.1:18189"
              --build-arg PIP_TRUSTED_HOST=127.0.0.1)
  log "PyTorch index unreachable: serving $(basename "$wheel") from 127.0.0.1:18189"
fi
mkdir -p "$WORK/context/models"
cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/specserve" "$WORK/context/"
cp -r "$ROOT/models/demo" "$WORK/context/models/"
find "$WORK/context" -name __pycache__ -prune -exec rm -rf {} +
docker build --network host -f "$ROOT/deploy/gpustack/Dockerfile" -t specserve:cpu \
  "${build_args[@]}" "$WORK/context" > "$WORK/docker-build.log" 2>&1 || die "image build failed, see $WORK/docker-build.log"
docker run --rm --network none specserve:cpu specserve --help >/dev/null || die "image cannot run specserve"

# --- GPUStack server + embedded worker -----------------------------------------------------
log "starting GPUStack $GPUSTACK_VERSION on $PORT (about 90 s on 2 cores)"
rm -rf "$WORK/gpustack"   # its state belongs to the database created above
"$VENV/bin/gpustack" start --api-port "$PORT" --data-dir "$WORK/gpustack" \
  --database-url "postgresql://postgres@127.0.0.1:$PG_PORT/gpustack" \
  --bootstrap-password "$PASSWORD" --enable-worker --gateway-mode disabled \
  --disable-update-check --disable-builtin-observability > "$WORK/gpustack.log" 2>&1 &
PIDS+=($!)
wait_for 600 "GPUStack's API" curl -sS --fail-with-body "$URL/healthz"
api() { curl -sS --fail-with-body -u "admin:$PASSWORD" -H 'content-type: application/json' "$@"; }
wait_for 300 "a ready worker" sh -c "curl -sS --fail-with-body -u admin:$PASSWORD '$URL/v2/workers' | grep -q '\"state\":\"ready\"'"
log "GPUStack up, worker ready"

# --- the specserve backend, the demo target with DSpark ------------------------------------
python3 -c 'import json,sys; print(json.dumps({"content": open(sys.argv[1]).read()}))' \
  "$ROOT/deploy/gpustack/specserve-backend.yaml" > "$WORK/backend.json"
api -d @"$WORK/backend.json" "$URL/v2/inference-backends/from-yaml" > "$WORK/backend.out" \
  || die "from-yaml refused the backend: $(cat "$WORK/backend.out")"
mkdir -p "$WORK/models" && cp -r "$ROOT/models/demo/target" "$WORK/models/demo-target"
D=/opt/specserve/models/demo/dspark
CLUSTER=$(api "$URL/v2/clusters" | python3 -c 'import json,sys; print(json.load(sys.stdin)["items"][0]["id"])')
api "$URL/v2/models" -d "{\"name\": \"demo\", \"source\": \"local_path\", \"cluster_id\": $CLUSTER,
  \"local_path\": \"$WORK/models/demo-target\", \"backend\": \"specserve-custom\",
  \"backend_version\": \"cpu-custom\", \"replicas\": 1, \"categories\": [\"llm\"], \"cpu_offloading\": true, \"enable_model_route\": true,
  \"backend_parameters\": [\"--speculative-algorithm\", \"DSPARK\",
    \"--speculative-draft-model-path\", \"$D\", \"--speculative-dspark-confidence-sts-path\", \"$D/sts.json\"]}" \
  > "$WORK/model.out" || die "model refused: $(cat "$WORK/model.out")"
log "deployed demo; waiting for running"
state() { api "$URL/v2/model-instances" | python3 -c 'import json,sys; i=json.load(sys.stdin)["items"]; print(i[0]["state"] + " " + (i[0].get("state_message") or "") if i else "none")'; }
for _ in $(seq 600); do
  s=$(state); case "$s" in running*) break ;; error*) die "instance: $s" ;; esac; sleep 1
done
[[ "$(state)" == running* ]] || die "instance not running after 600 s: $(state)"
log "instance running"

# --- an OpenAI chat request through GPUStack ------------------------------------------------
KEY=$(api "$URL/v2/api-keys" -d '{"name": "e2e", "scope": ["inference"]}' \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["value"])')
curl -sS --fail-with-body "$URL/v1/chat/completions" -H "Authorization: Bearer $KEY" -H 'content-type: application/json' \
  -d '{"model": "demo", "max_tokens": 24, "temperature": 0, "messages": [{"role": "user", "content": "def add(a, b):"}]}' \
  > "$WORK/chat.json" || die "chat request failed: $(cat "$WORK/chat.json")"
python3 - "$WORK/chat.json" <<'PY' || die "bad answer: $(cat "$WORK/chat.json")"
import json, sys
r = json.load(open(sys.argv[1]))
text = r["choices"][0]["message"]["content"]
assert r["usage"]["completion_tokens"] > 0 and text.strip(), r
print("answer:", repr(text[:120]), r["usage"])
PY
log "PASS: GPUStack $GPUSTACK_VERSION served the demo target with DSpark through specserve-custom"
