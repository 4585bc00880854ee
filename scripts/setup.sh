#!/usr/bin/env bash
# Installs what peerlink's build, tests and benchmarks need on a fresh machine (Debian), and
# nothing when it is already there. Safe to run repeatedly.
#   coturn      turnserver + turnutils_* : interop tests and the relay benchmark baseline
#   nftables, iproute2, conntrack : the NAT lab (network namespaces, NAT rules, mapping flushes)
#   cmake, pkg-config, libopus-dev : the Opus codec for the reference client
#   postgresql  initdb + postgres (and the `postgres` user): signaling's PostgreSQL store tests
#               start their own server in a temporary directory; the package's cluster is never
#               started here
set -euo pipefail

need_cmds=(turnserver:coturn turnutils_uclient:coturn nft:nftables ip:iproute2
           conntrack:conntrack cmake:cmake pkg-config:pkg-config)
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
  # Never let a package start its daemon here (coturn and postgresql ship services): tests
  # start their own.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo-nextest >/dev/null 2>&1 && ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
echo "setup: ok"
