#!/usr/bin/env bash
# Runs the CUDA tests and GPU benches on a machine with a GPU and no Rust toolchain, from
# binaries built elsewhere (scripts/gpu-pack.sh puts them, the PTX and the model into gpu-xfer/).
#   scripts/gpu-check.sh [tests|smollm2|bench|all]      SWEEP=1: also the split heuristics' sweeps;
#   SKIP="gemv attention adapter-load": leave those benches out; PROFILE=1: ncu per-kernel times
# Three calls in a row while the machine stays warm: gpu-xfer/bin.txz with `all`, then
# gpu-xfer/a.xz (unpacked to /tmp), then gpu-xfer/b.xz with `smollm2`.
# Results go to stdout and, when $OUT is set, to $OUT/*.log.
set -uo pipefail
cd "$(dirname "$0")/.."
# Unpack what gpu-pack.sh put in gpu-xfer/ into /tmp (kept there while the machine stays warm, so
# a second call can bring the model's other half) and link it where the steps below look.
T=/tmp/edgelora-xfer; mkdir -p $T/gpu-model
[ -f gpu-xfer/bin.txz ] && tar -xJf gpu-xfer/bin.txz -C $T
for part in a b; do
    [ -f gpu-xfer/$part.xz ] && xz -dc gpu-xfer/$part.xz > $T/gpu-model/$part
done
[ -e gpu-carry ] || ln -s $T/gpu-carry gpu-carry
[ -e gpu-model ] || ln -s $T/gpu-model gpu-model
C=gpu-carry
OUTDIR="${OUT:-/tmp/edgelora-gpu}"; mkdir -p "$OUTDIR"
export EDGELORA_PTX_DIR="$PWD/$C/ptx" EDGELORA_KERNELS="$PWD/$C/ptx" EDGELORA_REQUIRE_GPU=1
export EDGELORA_FIXTURES="$PWD/tests/fixtures" EDGELORAD_BIN="$PWD/$C/edgelorad"
export EDGELORA_CACHE="${EDGELORA_CACHE:-/tmp/edgelora-cache}"
chmod +x $C/* 2>/dev/null
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
what="${1:-all}"
rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
    echo "== kernel tests (CUDA vs CPU references) $(date +%T)"
    timeout 300 $C/kernels-test cuda --test-threads 1 2>&1 | tee "$OUTDIR/kernels.log" | grep -v "^test .* ok$" || rc=1
    if grep -q "BlockScaled" "$OUTDIR/kernels.log" && grep -q "panicked" "$OUTDIR/kernels.log"; then
        # The block-scaled INT4 GEMV failed its check: the rest runs on the first version.
        echo "!! block-scaled INT4 GEMV failed: EDGELORA_INT4_GEMV=per-weight from here on"
        export EDGELORA_INT4_GEMV=per-weight
    fi
    echo "== tiny-llama goldens on CUDA"
    timeout 300 $C/tiny-goldens-test goldens_hold_on_cuda --nocapture 2>&1 | tee "$OUTDIR/goldens.log" | tail -n 15 || rc=1
    echo "== daemon device tests"
    timeout 120 $C/daemon-test device 2>&1 | tail -n 8 || rc=1
fi
if [ "$what" = smollm2 ] || [ "$what" = all ]; then
    if [ -f gpu-model/a ] && [ -f gpu-model/b ]; then
        cat gpu-model/a gpu-model/b > /tmp/smollm2.gguf
        export EDGELORA_SMOLLM2_GGUF=/tmp/smollm2.gguf
        echo "== SmolLM2 greedy on CUDA vs the goldens (and so the CPU)"
        timeout 300 $C/smollm2-test cuda_ --nocapture 2>&1 | tee "$OUTDIR/smollm2.log" | tail -n 8 || rc=1
    else
        echo "== SmolLM2 parts missing (gpu-model/a, gpu-model/b): skipped"
    fi
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    B=$C/edgelora-bench
    # SKIP="gemv attention adapter-load": leave those benches out (unchanged code, short device time).
    skip() { case " ${SKIP:-} " in *" $1 "*) echo "== $1: skipped (SKIP)"; return 0;; esac; return 1; }
    skip gemv || {
    echo "== GEMV"
    timeout 120 $B gpu gemv 2>&1 | tee "$OUTDIR/gemv.log"
    # SWEEP=1: also the split heuristics' neighbours (GEMV split-K target, attention split size).
    if [ "${SWEEP:-0}" = 1 ]; then
        for bps in 1 4; do
            echo "== GEMV, split-K aiming at $bps blocks per SM"
            EDGELORA_GEMV_BLOCKS_PER_SM=$bps timeout 120 $B gpu gemv --iters 100 2>&1 | grep "m=1 " | tee -a "$OUTDIR/gemv-splits.log"
        done
    fi
    }
    skip attention || { echo "== attention"
    timeout 150 $B gpu attention $([ "${SWEEP:-0}" = 1 ] && echo --splits 2,4,8,16,32,64,128) 2>&1 | tee "$OUTDIR/attention.log"
    # PROFILE=1: each attention kernel's device time at 32K, in launch order (dense, then the
    # sparse configurations, four runs each).
    if [ "${PROFILE:-0}" = 1 ] && [ -x /usr/local/cuda/bin/ncu ]; then
        echo "== ncu: attention kernels at 32K context"
        timeout 120 /usr/local/cuda/bin/ncu --metrics gpu__time_duration.sum --cache-control none \
            --clock-control none -k regex:attn_ --csv $B gpu attention --ctx 32768 --iters 1 \
            2>/dev/null > "$OUTDIR/ncu-attention.csv"
        python3 - "$OUTDIR/ncu-attention.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
hdr = next((r for r in rows if r and r[0] == "ID"), None)
for r in rows:
    if hdr and len(r) == len(hdr) and r[0] != "ID":
        d = dict(zip(hdr, r))
        us = float(d["Metric Value"].replace(",", "")) / 1e3
        print(f'{d["Kernel Name"].split("(")[0]:22s} grid {d.get("Grid Size", ""):14s} {us:8.2f} us')
PY
    fi; }
    for shape in smollm2 llama-1b llama-8b; do
        echo "== decode $shape, int8 activations (the default) $(date +%T)"
        timeout 150 $B gpu decode --synth $shape --kv int4 --batch 1,16,64 --adapters 16 --rank 16 2>&1 | tee "$OUTDIR/decode-$shape.log"
        echo "== decode $shape, f32 activations (exact) $(date +%T)"
        timeout 100 $B gpu decode --synth $shape --kv int4 --act f32 --batch 1,16 2>&1 | tee "$OUTDIR/decode-$shape-f32.log"
    done
    if [ "${SWEEP:-0}" = 1 ]; then
        echo "== decode llama-1b, per-weight INT4 GEMV kernels $(date +%T)"
        EDGELORA_INT4_GEMV=per-weight timeout 100 $B gpu decode --synth llama-1b --kv int4 --batch 1 2>&1 | tee "$OUTDIR/decode-llama-1b-per-weight.log"
    fi
    # PROFILE=1: per-kernel device time of decode steps (Nsight Compute, where the machine has
    # it): each kernel timed alone with cold caches, so small kernels read high.
    if [ "${PROFILE:-0}" = 1 ] && [ -x /usr/local/cuda/bin/ncu ]; then
        for act in int8 f32; do
            echo "== ncu: decode llama-1b batch 1, act $act (per kernel, summed over 260 launches)"
            timeout 120 /usr/local/cuda/bin/ncu --metrics gpu__time_duration.sum --launch-skip 900 \
                --launch-count 260 --csv $B gpu decode --synth llama-1b --kv int4 --act $act \
                --batch 1 --steps 3 --prompt 4 2>/dev/null > "$OUTDIR/ncu-$act.csv"
            python3 - "$OUTDIR/ncu-$act.csv" <<'PY'
import csv, collections, sys
rows = list(csv.reader(open(sys.argv[1])))
hdr = next((r for r in rows if r and r[0] == "ID"), None)
agg = collections.defaultdict(lambda: [0, 0.0])
for r in rows:
    if hdr and len(r) == len(hdr) and r[0] != "ID":
        d = dict(zip(hdr, r))
        a = agg[d["Kernel Name"].split("(")[0]]
        a[0] += 1
        a[1] += float(d["Metric Value"].replace(",", "")) / 1e3
for k, (n, us) in sorted(agg.items(), key=lambda x: -x[1][1]):
    print(f"{k:28s} {n:4d} launches {us:9.1f} us  avg {us / n:7.2f} us")
PY
        done
    fi
    skip adapter-load || { echo "== cold adapter load NVMe -> VRAM"
    timeout 120 $B gpu adapter-load 2>&1 | tee "$OUTDIR/adapter-load.log"; }
fi
exit $rc
