#!/usr/bin/env bash
# A multi-node peerlink fleet on this machine's loopback, scraped by a real Prometheus.
#
#   fleet.sh up [--signaling N] [--directories N] [--relays N] [--engines] [--dir DIR]
#   fleet.sh status [--dir DIR]
#   fleet.sh down [--dir DIR]
#
# `up` starts N directories, N relays and N signaling nodes (1 of each by default) from the
# workspace's binaries, each with its documented defaults plus only the wiring a fleet needs:
# loopback addresses on free ports, the directory URL, the shared secrets, the shared store, a
# node id per signaling node, and --allow-peer 127.0.0.0/8 on the relays (their peers are on
# loopback, which the relay's peer policy denies otherwise). It waits for each /healthz and for
# the directory to list every relay and signaling node, then starts Prometheus scraping every
# /metrics once a second with deploy/prometheus/rules loaded, and prints one JSON line:
#
#   {"signaling":["http://127.0.0.1:P",...],"stun":["127.0.0.1:P",...],
#    "directory":["http://127.0.0.1:P",...],
#    "relays":[{"turn":"127.0.0.1:P","metrics":"http://127.0.0.1:P/metrics"},...],
#    "postgres":null|"postgres://...","redis":null|"redis://...",
#    "prometheus":"http://127.0.0.1:P"|null,"console":"http://127.0.0.1:P/console",
#    "operator_token":"TOKEN","state":"DIR"}
#
# "console" is the first directory's fleet console; "operator_token" opens it (every directory
# of the fleet takes it; a fresh random one per fleet, also in DIR/operator-token).
#
# The signaling nodes share one store: one SQLite file in DIR, or with --engines a PostgreSQL
# server started in DIR (`postgres://...`, given as PEERLINK_STORE, the environment's --store). --engines also starts redis-server for the
# directories, passed as `--store redis://...` when the directory's --help mentions redis
# (without it each directory keeps its registry in its own memory).
#
# Relays and signaling nodes take one directory URL: they all register with the first
# directory, unless their --help says --directory takes several comma-separated URLs (then they
# get every directory). The other directories see those registrations only through a shared
# store.
#
# `status` prints the same JSON with "processes": each started process, its pid, whether it
# runs and whether it answers its health check; it exits 1 when one does not. `down` stops
# every process it started by pid (SIGTERM; relays and PostgreSQL SIGINT, their immediate and
# fast shutdowns, since nothing in a local fleet waits for a drain; SIGKILL after
# PEERLINK_FLEET_STOP_TIMEOUT seconds, default 10) and removes the state directory; it is
# idempotent. A second `up` while a fleet runs in the same directory is refused.
#
# State (pids, logs, configuration, secrets in secrets.env, databases) lives in DIR, default
# ${XDG_RUNTIME_DIR:-/tmp}/peerlink-fleet. Binaries: $PEERLINK_BIN_DIR, else the workspace's
# target/release or target/debug (under $CARGO_TARGET_DIR when set; the more recently built of
# the two when both are complete), built with cargo (debug) when neither is. Needs python3
# (free ports, health checks, JSON), prometheus, and with --engines PostgreSQL's server binaries
# and redis-server: scripts/setup.sh installs them.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
START_TIMEOUT=${PEERLINK_FLEET_START_TIMEOUT:-60}
STOP_TIMEOUT=${PEERLINK_FLEET_STOP_TIMEOUT:-10}
MARKER=.peerlink-fleet

die() {
  echo "fleet.sh: $*" >&2
  exit 1
}

usage() {
  sed -n '4,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,3\}//' >&2
  exit 2
}

log() { echo "fleet.sh: $*" >&2; }

# ---------------------------------------------------------------------------------------------
# Small helpers (python3 for what bash cannot do safely).

# A free loopback port: the kernel picks it for a socket bound to port 0, which is then closed.
# A small race remains until the service binds it; a failed start is retried.
free_port() { # tcp|udp
  python3 - "$1" <<'EOF'
import socket, sys
kind = socket.SOCK_DGRAM if sys.argv[1] == "udp" else socket.SOCK_STREAM
s = socket.socket(socket.AF_INET, kind)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
EOF
}

# Exit 0 when GET url answers 2xx within 2 s.
http_ok() {
  python3 - "$1" <<'EOF'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        sys.exit(0 if 200 <= r.status < 300 else 1)
except Exception:
    sys.exit(1)
EOF
}

# Exit 0 when redis answers PING on 127.0.0.1:port.
redis_ok() {
  python3 - "$1" <<'EOF'
import socket, sys
try:
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2)
    s.sendall(b"PING\r\n")
    sys.exit(0 if s.recv(16).startswith(b"+PONG") else 1)
except Exception:
    sys.exit(1)
EOF
}

# Exit 0 when something accepts TCP connections on 127.0.0.1:port.
tcp_ok() {
  python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2).close()' \
    "$1" 2>/dev/null
}

random_secret() { python3 -c 'import secrets; print(secrets.token_hex(32))'; }

# The process start time of pid (field 22 of /proc/PID/stat), to tell our process from a later
# one that reuses its pid; fails when there is no such process or it has exited (a zombie).
start_time() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  # The command name (field 2) may hold spaces: cut after its closing parenthesis.
  stat=${stat##*) }
  # shellcheck disable=SC2086 # word splitting of the remaining fields is the point
  set -- $stat
  [ "$1" != Z ] || return 1
  echo "${20}"
}

# Whether the process recorded as (pid, start time) still runs.
alive() {
  local now
  now=$(start_time "$1") || return 1
  [ "$now" = "$2" ]
}

# ---------------------------------------------------------------------------------------------
# Binaries.

find_bins() {
  local names=(peerlink-directory peerlink-relay peerlink-signaling) target d n ok
  if [ -n "${PEERLINK_BIN_DIR:-}" ]; then
    for n in "${names[@]}"; do
      [ -x "$PEERLINK_BIN_DIR/$n" ] || die "$PEERLINK_BIN_DIR/$n not found (\$PEERLINK_BIN_DIR)"
    done
    BIN_DIR=$PEERLINK_BIN_DIR
    return
  fi
  target=${CARGO_TARGET_DIR:-$ROOT/target}
  BIN_DIR=""
  for d in "$target/release" "$target/debug"; do
    ok=1
    for n in "${names[@]}"; do [ -x "$d/$n" ] || ok=0; done
    # Of two complete sets, the more recently built one.
    if [ "$ok" = 1 ] && { [ -z "$BIN_DIR" ] || [ "$d/peerlink-relay" -nt "$BIN_DIR/peerlink-relay" ]; }; then
      BIN_DIR=$d
    fi
  done
  [ -z "$BIN_DIR" ] || return 0
  log "building the service binaries (cargo build; none complete in $target/release or $target/debug)"
  (cd "$ROOT" && cargo build -p peerlink-directory -p peerlink-relay -p peerlink-signaling --bins >&2) \
    || die "cargo build failed"
  BIN_DIR=$target/debug
}

# Whether the --directory option in BIN's --help says it takes several comma-separated URLs.
takes_several_directories() {
  "$1" --help 2>/dev/null | grep -A3 -- '--directory <' | grep -qi 'comma'
}

# ---------------------------------------------------------------------------------------------
# Process bookkeeping: $STATE/pids holds "name pid start-time stop-signal" lines, written as
# soon as a process is started (so that a failed start-up stops it too); $STATE/health holds
# "name check" lines once a service is up, the check being an http URL, redis:PORT or tcp:PORT.

record() { # name pid signal
  local st
  st=$(start_time "$2") || st=0
  echo "$1 $2 $st $3" >>"$STATE/pids"
}

healthy_at() { # name check
  echo "$1 $2" >>"$STATE/health"
}

# A start attempt that failed: kill the process and forget it.
discard() { # pid
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  awk -v pid="$1" '$2 != pid' "$STATE/pids" >"$STATE/pids.new"
  mv "$STATE/pids.new" "$STATE/pids"
}

# Start `"$@"` in the background with its output in $STATE/logs/NAME.log and its working
# directory $STATE/NAME, and record it to be stopped with SIGNAL; sets PID.
spawn() { # name signal cmd...
  local name=$1 sig=$2
  shift 2
  mkdir -p "$STATE/$name"
  (cd "$STATE/$name" && exec "$@") </dev/null >"$STATE/logs/$name.log" 2>&1 &
  PID=$!
  record "$name" "$PID" "$sig"
}

log_tail() { tail -n 20 "$STATE/logs/$1.log" 2>/dev/null | sed 's/^/    /' >&2 || true; }

# Wait until the log of NAME (pid PID) has a line matching the extended regex; print the first
# match's captured address (the text after the prefix).
wait_announce() { # name pid prefix
  local deadline=$((SECONDS + START_TIMEOUT)) line
  while [ $SECONDS -lt $deadline ]; do
    line=$(grep -m1 -E "^$3" "$STATE/logs/$1.log" 2>/dev/null || true)
    if [ -n "$line" ]; then
      echo "${line#"$3"}"
      return 0
    fi
    start_time "$2" >/dev/null || { log "$1 exited before announcing its address:"; log_tail "$1"; return 1; }
    sleep 0.1
  done
  log "$1 announced no address within ${START_TIMEOUT}s:"
  log_tail "$1"
  return 1
}

# Wait until `check args...` succeeds while pid runs.
wait_ready() { # name pid check args...
  local name=$1 pid=$2 deadline=$((SECONDS + START_TIMEOUT))
  shift 2
  while [ $SECONDS -lt $deadline ]; do
    "$@" && return 0
    start_time "$pid" >/dev/null || { log "$name exited during start-up:"; log_tail "$name"; return 1; }
    sleep 0.2
  done
  log "$name not ready within ${START_TIMEOUT}s:"
  log_tail "$name"
  return 1
}

# Send one recorded process its stop signal; nothing when it is gone already.
stop_pid() { # pid start-time signal
  alive "$1" "$2" || return 0
  kill "-$3" "$1" 2>/dev/null || true
}

# Stop every recorded process, the last started first, and SIGKILL what still runs after
# STOP_TIMEOUT seconds.
stop_all() {
  [ -f "$STATE/pids" ] || return 0
  local lines=() l name pid st sig deadline left
  mapfile -t lines <"$STATE/pids"
  # Last started first.
  for ((i = ${#lines[@]} - 1; i >= 0; i--)); do
    read -r name pid st sig <<<"${lines[i]}"
    stop_pid "$pid" "$st" "$sig"
  done
  deadline=$((SECONDS + STOP_TIMEOUT))
  while :; do
    left=0
    for l in "${lines[@]}"; do
      read -r name pid st sig <<<"$l"
      if alive "$pid" "$st"; then left=1; fi
    done
    [ "$left" = 0 ] && break
    if [ $SECONDS -ge $deadline ]; then
      for l in "${lines[@]}"; do
        read -r name pid st sig <<<"$l"
        if alive "$pid" "$st"; then
          log "$name (pid $pid) still runs after ${STOP_TIMEOUT}s: SIGKILL"
          kill -KILL "$pid" 2>/dev/null || true
        fi
      done
      sleep 0.2
      break
    fi
    sleep 0.1
  done
}

any_alive() {
  [ -f "$STATE/pids" ] || return 1
  local name pid st sig
  while read -r name pid st sig; do
    if alive "$pid" "$st"; then return 0; fi
  done <"$STATE/pids"
  return 1
}

# ---------------------------------------------------------------------------------------------
# Services.

start_postgres() {
  local pgbin="" best=-1 d v owner=() port attempt password
  # The newest /usr/lib/postgresql/<version>/bin with both binaries.
  for d in /usr/lib/postgresql/*/bin; do
    v=${d#/usr/lib/postgresql/}
    v=${v%/bin}
    [[ $v =~ ^[0-9]+$ ]] || continue
    if [ -x "$d/initdb" ] && [ -x "$d/postgres" ] && [ "$v" -gt "$best" ]; then
      pgbin=$d
      best=$v
    fi
  done
  [ -n "$pgbin" ] || die "PostgreSQL server binaries not found (/usr/lib/postgresql/<version>/bin): run scripts/setup.sh"
  local pg=$STATE/postgres
  mkdir -p "$pg/sock" "$STATE/logs"
  password=$(random_secret)
  printf '%s\n' "$password" >"$pg/pwfile"
  chmod 700 "$pg"
  chmod 600 "$pg/pwfile"
  if [ "$(id -u)" -eq 0 ]; then
    # initdb and postgres refuse to run as root: run them as the postgres system user.
    getent passwd postgres >/dev/null || die "no postgres user to run PostgreSQL as: run scripts/setup.sh"
    chown -R postgres:postgres "$pg"
    setpriv --reuid=postgres --regid=postgres --init-groups -- test -x "$pg" \
      || die "the postgres user cannot reach $pg: use --dir under a directory it can traverse (e.g. /tmp)"
    owner=(setpriv --reuid=postgres --regid=postgres --init-groups --)
  fi
  "${owner[@]}" env HOME="$pg" "$pgbin/initdb" -D "$pg/data" -U peerlink --auth=scram-sha-256 \
    -E UTF8 --locale=C --pwfile="$pg/pwfile" --no-sync >"$STATE/logs/postgres-initdb.log" 2>&1 \
    || { log "initdb failed:"; log_tail postgres-initdb; return 1; }
  for attempt in 1 2 3; do
    port=$(free_port tcp)
    (cd "$pg" && exec "${owner[@]}" env HOME="$pg" "$pgbin/postgres" -D "$pg/data" \
      -c listen_addresses=127.0.0.1 -p "$port" -c unix_socket_directories="$pg/sock") \
      </dev/null >"$STATE/logs/postgres.log" 2>&1 &
    PID=$!
    record postgres "$PID" INT
    if wait_ready postgres "$PID" "$pgbin/pg_isready" -q -h 127.0.0.1 -p "$port" -d postgres; then
      healthy_at postgres "tcp:$port"
      break
    fi
    [ "$attempt" = 3 ] && return 1
    discard "$PID"
  done
  PGPASSWORD=$password "$pgbin/createdb" -h 127.0.0.1 -p "$port" -U peerlink peerlink \
    >>"$STATE/logs/postgres-initdb.log" 2>&1 || { log "createdb failed:"; log_tail postgres-initdb; return 1; }
  POSTGRES_URL="postgres://peerlink:$password@127.0.0.1:$port/peerlink"
}

start_redis() {
  command -v redis-server >/dev/null 2>&1 || die "redis-server not found: run scripts/setup.sh"
  local port attempt
  mkdir -p "$STATE/redis"
  for attempt in 1 2 3; do
    port=$(free_port tcp)
    spawn redis TERM redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
      --dir "$STATE/redis"
    if wait_ready redis "$PID" redis_ok "$port"; then
      healthy_at redis "redis:$port"
      REDIS_URL="redis://127.0.0.1:$port"
      return 0
    fi
    [ "$attempt" = 3 ] && return 1
    discard "$PID"
  done
}

start_directory() { # index
  local name=directory-$1 args=(--listen 127.0.0.1:0) addr
  if [ -n "$REDIS_URL" ] && "$BIN_DIR/peerlink-directory" --help 2>/dev/null | grep -qi redis; then
    args+=(--store "$REDIS_URL")
  fi
  # The console's operator token from a file (kept off the command line and the environment),
  # when this directory build has a console.
  if "$BIN_DIR/peerlink-directory" --help 2>/dev/null | grep -q -- '--operator-token-file'; then
    args+=(--operator-token-file "$STATE/operator-token")
  fi
  spawn "$name" TERM env PEERLINK_CLUSTER_TOKEN="$CLUSTER_TOKEN" "$BIN_DIR/peerlink-directory" \
    "${args[@]}"
  addr=$(wait_announce "$name" "$PID" "listening on ") || return 1
  wait_ready "$name" "$PID" http_ok "http://$addr/healthz" || return 1
  healthy_at "$name" "http://$addr/healthz"
  DIRECTORY_URLS+=("http://$addr")
}

start_relay() { # index directory-url
  local name=relay-$1 turn metrics attempt
  for attempt in 1 2 3; do
    # The probed ports can be taken before the relay binds them (it does not announce ports
    # it picked itself): then the start is retried on others.
    turn=127.0.0.1:$(free_port udp)
    metrics=127.0.0.1:$(free_port tcp)
    spawn "$name" INT env PEERLINK_RELAY_AUTH_SECRET="$TURN_SECRET" \
      PEERLINK_CLUSTER_TOKEN="$CLUSTER_TOKEN" "$BIN_DIR/peerlink-relay" --listen "$turn" \
      --metrics "$metrics" --allow-peer 127.0.0.0/8 --directory "$2"
    if wait_ready "$name" "$PID" http_ok "http://$metrics/healthz"; then
      healthy_at "$name" "http://$metrics/healthz"
      RELAY_TURN+=("$turn")
      RELAY_METRICS+=("$metrics")
      return 0
    fi
    [ "$attempt" = 3 ] && return 1
    discard "$PID"
    log "$name: retrying on other ports"
  done
}

start_signaling() { # index directory-url
  local name=signaling-$1 args store addr stun
  args=(--listen 127.0.0.1:0 --stun 127.0.0.1:0 --directory "$2" --node-id "$name")
  # The store as PEERLINK_STORE (the same as --store), which keeps its password off the
  # command line.
  store=${POSTGRES_URL:-sqlite:$STATE/signaling.db}
  spawn "$name" TERM env PEERLINK_TOKEN_SECRET="$TOKEN_SECRET" PEERLINK_TURN_SECRET="$TURN_SECRET" \
    PEERLINK_CLUSTER_TOKEN="$CLUSTER_TOKEN" PEERLINK_STORE="$store" \
    "$BIN_DIR/peerlink-signaling" "${args[@]}"
  addr=$(wait_announce "$name" "$PID" "http=") || return 1
  stun=$(wait_announce "$name" "$PID" "stun=") || return 1
  wait_ready "$name" "$PID" http_ok "http://$addr/healthz" || return 1
  healthy_at "$name" "http://$addr/healthz"
  SIGNALING_URLS+=("http://$addr")
  SIGNALING_STUN+=("${stun%%,*}")
}

# Exit 0 once the directory at url lists at least relays healthy relays and nodes nodes.
directory_knows() { # url relays nodes
  python3 - "$@" <<'EOF'
import sys, urllib.request
url, relays, nodes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
try:
    with urllib.request.urlopen(url + "/metrics", timeout=2) as r:
        text = r.read().decode()
except Exception:
    sys.exit(1)
got = {}
for line in text.splitlines():
    parts = line.split()
    if len(parts) == 2 and parts[0] in ("peerlink_directory_relays_healthy", "peerlink_directory_nodes"):
        got[parts[0]] = float(parts[1])
ok = got.get("peerlink_directory_relays_healthy", -1) >= relays and got.get("peerlink_directory_nodes", -1) >= nodes
sys.exit(0 if ok else 1)
EOF
}

start_prometheus() {
  if ! command -v prometheus >/dev/null 2>&1; then
    log "prometheus not found (run scripts/setup.sh): the fleet runs without it"
    return 0
  fi
  local p=$STATE/prometheus port attempt
  mkdir -p "$p/data"
  python3 - "$p/prometheus.yml" "$ROOT/deploy/prometheus/rules/peerlink.rules.yml" \
    "${DIRECTORY_URLS[*]}" "${SIGNALING_URLS[*]}" "${RELAY_METRICS[*]}" <<'EOF'
import json, sys
out, rules, dirs, sigs, relays = sys.argv[1:6]
def targets(urls):
    return [u.removeprefix("http://") for u in urls.split()]
jobs = [("peerlink-directory", targets(dirs)), ("peerlink-signaling", targets(sigs)),
        ("peerlink-relay", targets(relays))]
lines = [
    "# Generated by deploy/local/fleet.sh: every service of the local fleet, scraped each second.",
    "global:",
    "  scrape_interval: 1s",
    "  scrape_timeout: 1s",
    "  evaluation_interval: 1s",
    "rule_files:",
    f"  - {json.dumps(rules)}",
    "scrape_configs:",
]
for job, ts in jobs:
    lines += [f"  - job_name: {job}", "    static_configs:", f"      - targets: {json.dumps(ts)}"]
open(out, "w").write("\n".join(lines) + "\n")
EOF
  for attempt in 1 2 3; do
    port=$(free_port tcp)
    spawn prometheus TERM prometheus --config.file="$p/prometheus.yml" \
      --storage.tsdb.path="$p/data" --web.listen-address="127.0.0.1:$port"
    if wait_ready prometheus "$PID" http_ok "http://127.0.0.1:$port/-/ready"; then
      healthy_at prometheus "http://127.0.0.1:$port/-/healthy"
      PROMETHEUS_URL="http://127.0.0.1:$port"
      return 0
    fi
    [ "$attempt" = 3 ] && return 1
    discard "$PID"
  done
}

write_json() {
  python3 - "$STATE/fleet.json" "$STATE" "${SIGNALING_URLS[*]}" "${SIGNALING_STUN[*]}" \
    "${DIRECTORY_URLS[*]}" "${RELAY_TURN[*]}" "${RELAY_METRICS[*]}" "$POSTGRES_URL" "$REDIS_URL" \
    "$PROMETHEUS_URL" "$OPERATOR_TOKEN" <<'EOF'
import json, sys
out, state, sigs, stun, dirs, turns, metrics, pg, redis, prom, operator = sys.argv[1:12]
doc = {
    "signaling": sigs.split(),
    "stun": stun.split(),
    "directory": dirs.split(),
    "relays": [{"turn": t, "metrics": f"http://{m}/metrics"} for t, m in zip(turns.split(), metrics.split())],
    "postgres": pg or None,
    "redis": redis or None,
    "prometheus": prom or None,
    "console": dirs.split()[0] + "/console",
    "operator_token": operator,
    "state": state,
}
open(out, "w").write(json.dumps(doc, separators=(",", ":")) + "\n")
EOF
}

# ---------------------------------------------------------------------------------------------
# Commands.

cmd_up() {
  local n_sig=1 n_dir=1 n_relay=1 engines=0 i
  while [ $# -gt 0 ]; do
    case $1 in
      --signaling) n_sig=${2:?--signaling needs a number}; shift 2 ;;
      --directories) n_dir=${2:?--directories needs a number}; shift 2 ;;
      --relays) n_relay=${2:?--relays needs a number}; shift 2 ;;
      --engines) engines=1; shift ;;
      --dir) STATE=${2:?--dir needs a path}; shift 2 ;;
      -h | --help) usage ;;
      *) echo "fleet.sh up: unknown argument $1" >&2; usage ;;
    esac
  done
  for v in "$n_sig" "$n_dir" "$n_relay"; do
    [[ $v =~ ^[1-9][0-9]?$ ]] || { echo "fleet.sh up: counts are 1..99, got $v" >&2; exit 2; }
  done
  command -v python3 >/dev/null 2>&1 || die "python3 not found"

  if [ -e "$STATE" ]; then
    [ -f "$STATE/$MARKER" ] || die "$STATE exists and is not a fleet state directory: pick another --dir"
    if any_alive; then
      die "a fleet is already running in $STATE (fleet.sh status, fleet.sh down)"
    fi
    log "removing the state of a fleet that is no longer running in $STATE"
    rm -rf "$STATE"
  fi
  find_bins
  # mkdir without -p fails when another `up` created it first.
  mkdir -p "$(dirname "$STATE")"
  mkdir "$STATE" 2>/dev/null || die "a fleet is being started in $STATE already"
  : >"$STATE/$MARKER"
  # Others may traverse (PostgreSQL runs as its own user) but not list.
  chmod 711 "$STATE"
  mkdir -p "$STATE/logs"
  : >"$STATE/pids"
  : >"$STATE/health"
  trap 'log "start-up failed: stopping what was started"; stop_all; rm -rf "$STATE"' EXIT

  CLUSTER_TOKEN=$(random_secret)
  TOKEN_SECRET=$(random_secret)
  TURN_SECRET=$(random_secret)
  OPERATOR_TOKEN=$(random_secret)
  (
    umask 077
    printf 'PEERLINK_CLUSTER_TOKEN=%s\nPEERLINK_TOKEN_SECRET=%s\nPEERLINK_TURN_SECRET=%s\nPEERLINK_OPERATOR_TOKEN=%s\n' \
      "$CLUSTER_TOKEN" "$TOKEN_SECRET" "$TURN_SECRET" "$OPERATOR_TOKEN" >"$STATE/secrets.env"
    printf '%s\n' "$OPERATOR_TOKEN" >"$STATE/operator-token"
  )
  POSTGRES_URL="" REDIS_URL="" PROMETHEUS_URL=""
  DIRECTORY_URLS=() SIGNALING_URLS=() SIGNALING_STUN=() RELAY_TURN=() RELAY_METRICS=()

  if [ "$engines" = 1 ]; then
    start_postgres || exit 1
    start_redis || exit 1
  fi
  for ((i = 1; i <= n_dir; i++)); do start_directory "$i" || exit 1; done
  local relay_dir=${DIRECTORY_URLS[0]} sig_dir=${DIRECTORY_URLS[0]} joined
  joined=$(IFS=,; echo "${DIRECTORY_URLS[*]}")
  if takes_several_directories "$BIN_DIR/peerlink-relay"; then relay_dir=$joined; fi
  if takes_several_directories "$BIN_DIR/peerlink-signaling"; then sig_dir=$joined; fi
  for ((i = 1; i <= n_relay; i++)); do start_relay "$i" "$relay_dir" || exit 1; done
  # One after another: the first node also migrates a shared store.
  for ((i = 1; i <= n_sig; i++)); do start_signaling "$i" "$sig_dir" || exit 1; done
  wait_ready directory-1 "$(awk '$1 == "directory-1" {print $2}' "$STATE/pids")" \
    directory_knows "${DIRECTORY_URLS[0]}" "$n_relay" "$n_sig" \
    || die "the directory did not list $n_relay relays and $n_sig signaling nodes in time"
  start_prometheus || exit 1
  write_json
  trap - EXIT
  cat "$STATE/fleet.json"
}

cmd_status() {
  while [ $# -gt 0 ]; do
    case $1 in
      --dir) STATE=${2:?--dir needs a path}; shift 2 ;;
      -h | --help) usage ;;
      *) echo "fleet.sh status: unknown argument $1" >&2; usage ;;
    esac
  done
  if [ ! -f "$STATE/$MARKER" ] || [ ! -f "$STATE/fleet.json" ]; then
    die "no fleet in $STATE (fleet.sh up)"
  fi
  local rows=() name pid st sig health running healthy bad=0
  while read -r name pid st sig; do
    running=false healthy=null
    health=$(awk -v n="$name" '$1 == n {print $2}' "$STATE/health")
    if alive "$pid" "$st"; then
      running=true
      case $health in
        http*) if http_ok "$health"; then healthy=true; else healthy=false; fi ;;
        redis:*) if redis_ok "${health#redis:}"; then healthy=true; else healthy=false; fi ;;
        tcp:*) if tcp_ok "${health#tcp:}"; then healthy=true; else healthy=false; fi ;;
      esac
    fi
    [ "$running" = true ] && [ "$healthy" != false ] || bad=1
    rows+=("$name $pid $running $healthy")
  done <"$STATE/pids"
  python3 - "$STATE/fleet.json" "${rows[@]}" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
procs = []
for row in sys.argv[2:]:
    name, pid, running, healthy = row.split()
    procs.append({"name": name, "pid": int(pid), "running": running == "true",
                  "healthy": json.loads(healthy)})
doc["processes"] = procs
print(json.dumps(doc, separators=(",", ":")))
EOF
  return "$bad"
}

cmd_down() {
  while [ $# -gt 0 ]; do
    case $1 in
      --dir) STATE=${2:?--dir needs a path}; shift 2 ;;
      -h | --help) usage ;;
      *) echo "fleet.sh down: unknown argument $1" >&2; usage ;;
    esac
  done
  if [ ! -e "$STATE" ]; then
    log "no fleet in $STATE"
    return 0
  fi
  [ -f "$STATE/$MARKER" ] || die "$STATE is not a fleet state directory: not touching it"
  stop_all
  rm -rf "$STATE"
  log "stopped; $STATE removed"
}

STATE=${XDG_RUNTIME_DIR:-/tmp}/peerlink-fleet
[ $# -ge 1 ] || usage
cmd=$1
shift
case $cmd in
  up) cmd_up "$@" ;;
  status) cmd_status "$@" ;;
  down) cmd_down "$@" ;;
  -h | --help | help) usage ;;
  *) echo "fleet.sh: unknown command $cmd" >&2; usage ;;
esac
