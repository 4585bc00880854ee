#!/usr/bin/env bash
# Bounded fuzzing of peerlink-proto's `parse` target on the stable toolchain.
#
#   scripts/fuzz.sh [SECONDS]   (default 60)
#
# Installs cargo-fuzz if missing, runs `cargo fuzz run parse` for SECONDS with
# RUSTC_BOOTSTRAP=1 (cargo-fuzz passes nightly-only flags), exploring from the checked-in seed
# corpus (proto/fuzz/corpus/parse) in a scratch copy, so a run never grows the checked-in set.
# A crash leaves its input in proto/fuzz/artifacts/parse/ and exits non-zero.
set -euo pipefail

secs="${1:-60}"
case "$secs" in ''|*[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2;; esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz_dir="$root/proto/fuzz"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
cp "$fuzz_dir/corpus/parse/"* "$scratch/" 2>/dev/null || true

cd "$root/proto"
export RUSTC_BOOTSTRAP=1
# -rss_limit_mb bounds memory; -max_len keeps inputs datagram-sized (STUN over UDP).
cargo fuzz run parse "$scratch" "$fuzz_dir/corpus/parse" -- \
  -max_total_time="$secs" -max_len=2048 -rss_limit_mb=2048 -timeout=10 -print_final_stats=1
