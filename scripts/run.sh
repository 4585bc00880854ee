#!/usr/bin/env bash
# The README's "run" command: builds peerlink and runs its main job on embedded defaults.
# Today that is the wire codec's round trip; with the reference client it becomes a local fleet
# (directory, signaling, relay on loopback) and a demo call.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace --locked
cargo run --release --locked -q -p peerlink-proto --example stun_roundtrip
