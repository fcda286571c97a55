#!/usr/bin/env bash
# The end-to-end demo: builds the binaries, then runs two hubs and three devices on loopback.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release --workspace --bins
exec target/release/demo
