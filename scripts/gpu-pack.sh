#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a GPU machine without Rust: stripped test and bench
# binaries and the PTX of every kernel (edgelorad kernels build), into gpu-carry/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
C=gpu-carry; rm -rf $C; mkdir -p $C/ptx
CACHE="${EDGELORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgelora}"
NVRTC="$(find "$CACHE/cuda-venv" -path '*nvidia/cuda_nvrtc/lib' -type d 2>/dev/null | head -n1)"
[ -n "$NVRTC" ] || { echo "run scripts/test.sh once first: it installs NVRTC into $CACHE/cuda-venv" >&2; exit 1; }
export LD_LIBRARY_PATH="$NVRTC${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Two builds: `--bin edgelorad` would also filter the bench package's binaries away.
cargo build --release -q -p edgelora-daemon --bin edgelorad
cargo build --release -q -p edgelora-bench --bin edgelora-bench
./target/release/edgelorad kernels build --arch sm_90 --out $C/ptx >/dev/null
cp target/release/edgelorad target/release/edgelora-bench $C/
testbin() { cargo test --release -q "$@" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]!=["bin"]: print(m["executable"])' | tail -n1; }
cp "$(testbin -p edgelora-kernels --lib)" $C/kernels-test
cp "$(testbin -p edgelora-daemon --lib)" $C/daemon-test
cp "$(testbin -p edgelora-tests --test tiny_goldens)" $C/tiny-goldens-test
cp "$(testbin -p edgelora-tests --test smollm2)" $C/smollm2-test
# The SmolLM2 GGUF (94 MB) is larger than one transfer to the GPU machine may be: two parts.
GGUF="$(./target/release/edgelorad model fetch 2>/dev/null || true)"
if [ -f "$GGUF" ]; then
    rm -rf gpu-model; mkdir -p gpu-model
    head -c 50000000 "$GGUF" > gpu-model/a
    tail -c +50000001 "$GGUF" > gpu-model/b
fi
strip $C/edgelorad $C/edgelora-bench $C/*-test
du -sh $C $C/*
# What travels to the GPU machine (at most 64 MiB per call with the working tree): the binaries
# in one archive, and each half of the model compressed, for two calls in a row (the second
# finds the first's files under /tmp while the machine stays warm). gpu-check.sh unpacks them.
X=gpu-xfer; rm -rf $X; mkdir -p $X
tar -cJf $X/bin.txz $C
if [ -d gpu-model ]; then
    xz -T0 -6 -c gpu-model/a > $X/a.xz
    xz -T0 -6 -c gpu-model/b > $X/b.xz
fi
du -sh $X/*
