#!/usr/bin/env bash
# The README's "run" command: builds peerlink and runs its main job on embedded defaults —
# a local fleet (directory, signaling, relay on loopback), two users, chat, a direct call and a
# relay call with real Opus media, TURN through the relay; the report is printed and the
# recorded WAVs are left in ./demo-out.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace --locked
mkdir -p demo-out
cargo run --release --locked -q -p peerlink-sim -- demo --out demo-out "$@"
