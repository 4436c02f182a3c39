//! `edgelora-bench`: figures printed beside a yardstick measured in the same run (memory
//! bandwidth, our own GEMM peak, llama.cpp), never timing assertions. See benches/README.md.

mod adapters;
mod common;
mod decode;
mod gpu;
mod gpu_load;
mod ledger;
mod llamacpp;
mod lora_mix;
mod membw;
mod prefill;
mod report;
mod rng;
mod serve;
mod swap;
mod sync;
mod synth;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::report::{Context, Report, Row};

#[derive(Parser, Debug)]
#[command(
    name = "edgelora-bench",
    about = "edgelora benchmarks: figures beside a yardstick measured in the same run"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Memory read bandwidth, one thread and all threads (the decode yardstick).
    Membw(MembwArgs),
    /// Decode tokens/s against the bandwidth bound (and llama.cpp, and adapter mixes).
    Decode(decode::DecodeArgs),
    /// Prefill tokens/s and GFLOP/s against our INT4 GEMM peak (and llama.cpp).
    Prefill(prefill::PrefillArgs),
    /// The compute ceiling of our INT4 x int8 kernel on an L2-resident weight.
    GemmPeak(prefill::GemmPeakArgs),
    /// Write a Hugging Face folder with random weights of a real model's shape.
    Synth(synth::SynthArgs),
    /// CUDA benches (needs a GPU): INT4 GEMV vs copy bandwidth, decode, long-context attention,
    /// cold adapter loads into VRAM.
    Gpu(gpu::GpuArgs),
    /// Load over real HTTP against `edgelorad serve`, beside in-process decode at the same batch.
    Serve(serve::ServeBenchArgs),
    /// Cold adapter load: pack read (io_uring, pread) and decode against a raw O_DIRECT read of
    /// the same file, and TTFT cold vs warm through `edgelorad serve`.
    Swap(swap::SwapArgs),
    /// The projections of a decode step with no adapter, one shared and B distinct adapters, beside
    /// each other (what mixed adapters add to the products).
    LoraMix(lora_mix::LoraMixArgs),
    /// Throughput over 1..thousands of distinct adapters through a small pool, against one
    /// adapter and the base model in the same run.
    Adapters(adapters::AdaptersArgs),
    /// Attribution ledger: durable events/s (1, 16, 256 writers) beside the raw 4 KiB
    /// write+fdatasync rate measured just before, bytes per event beside the aim, reopen of a
    /// 1,000,000-event log beside a plain read of it.
    Ledger(ledger::LedgerArgs),
    /// Attribution ledger crash torture: SIGKILL a writing child process at random moments;
    /// every acknowledged event must be present exactly once and `verify` pass after each reopen.
    LedgerSoak(ledger::SoakArgs),
    /// Fleet sync over loopback mTLS: catch-up time for a backlog (default a week offline,
    /// 1,000,000 events) and events/s, beside raw TLS throughput and the device-side build rate.
    Sync(sync::SyncArgs),
    /// The crash-torture child that `ledger-soak` starts (not for use by hand).
    #[command(name = "ledger-soak-child", hide = true)]
    LedgerSoakChild,
}

#[derive(Args, Debug)]
struct MembwArgs {
    /// Buffer size in MiB (much larger than the last-level cache).
    #[arg(long, default_value_t = 1024)]
    mib: usize,
    /// Threads of the all-thread measurement (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Measurements (best kept).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    #[arg(long)]
    json: bool,
}

fn run_membw(a: MembwArgs) -> Result<()> {
    let threads = common::resolve_threads(a.threads);
    let bw = membw::measure(a.mib << 20, threads, a.reps);
    let mut report = Report::new(
        a.json,
        Context {
            threads,
            batch: None,
            model: None,
        },
    );
    let note = format!("best of {} reads of {} MiB", a.reps, bw.bytes >> 20);
    report.push(Row::new("membw", "read bandwidth (1 thread)", bw.single_gbs, "GB/s").note(note));
    report.push(
        Row::new(
            "membw",
            format!("read bandwidth ({threads} threads)"),
            bw.all_gbs,
            "GB/s",
        )
        .vs("1 thread", bw.single_gbs),
    );
    report.print();
    Ok(())
}

fn main() -> Result<()> {
    // A `ledger-soak` child (this binary, re-run with the torture's environment) appends until
    // it is killed and never returns from here.
    edgelora_ledger::torture::child_main_if_requested();
    match Cli::parse().cmd {
        Cmd::Membw(a) => run_membw(a),
        Cmd::Decode(a) => decode::run(a),
        Cmd::Prefill(a) => prefill::run(a),
        Cmd::GemmPeak(a) => prefill::run_gemm_peak(a),
        Cmd::Synth(a) => synth::run(a),
        Cmd::Gpu(a) => gpu::run(a),
        Cmd::Serve(a) => serve::run(a),
        Cmd::Swap(a) => swap::run(a),
        Cmd::Adapters(a) => adapters::run(a),
        Cmd::LoraMix(a) => lora_mix::run(a),
        Cmd::Ledger(a) => ledger::run(a),
        Cmd::LedgerSoak(a) => ledger::run_soak(a),
        Cmd::Sync(a) => sync::run(a),
        Cmd::LedgerSoakChild => ledger::run_soak_child(),
    }
}
