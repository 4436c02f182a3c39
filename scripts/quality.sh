#!/usr/bin/env bash
# Perplexity of the default model on public-domain text (KJV Genesis, Debian package bible-kjv)
# with f16 and INT4 KV caches and query-aware page sparsity, by llama-perplexity's method, so
# the deltas of INT4 KV and sparsity can be judged on real text. Prints one line per setting.
#   scripts/quality.sh [--chunks N]   (default: every whole window of the text)
set -euo pipefail
cd "$(dirname "$0")/.."
chunks=()
[ "${1:-}" = "--chunks" ] && chunks=(--chunks "$2")

if ! command -v bible >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq bible-kjv >/dev/null
fi
text=$(mktemp --suffix=.txt)
trap 'rm -f "$text"' EXIT
bible -f "Gen1:1-Gen50:26" > "$text"

cargo build --release --locked -p edgelora-daemon --bin edgelorad >/dev/null
bin=./target/release/edgelorad
model=$($bin model fetch)
run() {
    local label=$1; shift
    local out
    out=$($bin eval perplexity --model "$model" --text "$text" --json "${chunks[@]}" "$@" 2>/dev/null)
    printf '%-34s %s\n' "$label" "$out"
}
for ctx in 512 2048; do
    run "ctx $ctx f16 KV" --ctx "$ctx" --kv f16
    run "ctx $ctx int4 KV" --ctx "$ctx" --kv int4
    run "ctx $ctx f16 KV sparse 256" --ctx "$ctx" --kv f16 --sparse-budget 256
    run "ctx $ctx f16 KV sparse 128" --ctx "$ctx" --kv f16 --sparse-budget 128
    run "ctx $ctx int4 KV sparse 256" --ctx "$ctx" --kv int4 --sparse-budget 256
    # Finer pages rank relevance more precisely (more pages to score, same token budget).
    run "ctx $ctx f16 KV sparse 256 4-token pages" --ctx "$ctx" --kv f16 --sparse-budget 256 --page-size 4
    run "ctx $ctx f16 KV sparse 128 4-token pages" --ctx "$ctx" --kv f16 --sparse-budget 128 --page-size 4
done
