#!/usr/bin/env bash
# The one command that passes all of peerlink's checks on a fresh machine:
# installs missing system packages, then formatting, lints, every test and the fuzz corpus replay.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

bash scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== doc tests"
cargo test --workspace --doc --locked

# Last, so that its summary ("N tests run: N passed") is the run's closing test line.
echo "== tests (cargo nextest)"
cargo nextest run --workspace --locked --profile "${NEXTEST_PROFILE:-ci}" --no-tests=fail

echo "== all checks passed in $(( $(date +%s) - start )) s"
