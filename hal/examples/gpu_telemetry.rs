//! Prints what GPU telemetry this machine has, as samples and as Prometheus text.
//!
//! `cargo run -p edgelora-hal --example gpu_telemetry [ROOT]` (ROOT defaults to `/`; point it at
//! a copy of a Jetson's /sys and /proc to try the Jetson backend elsewhere).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use edgelora_hal::telemetry::{auto_detect, metrics};
use prometheus_client::registry::Registry;

fn main() -> ExitCode {
    let root = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from("/"), PathBuf::from);
    let Some(telemetry) = auto_detect(&root) else {
        println!("no GPU telemetry on this machine (no NVML, no Jetson GPU under {root:?})");
        return ExitCode::SUCCESS;
    };
    match telemetry.sample() {
        Ok(samples) => {
            for sample in &samples {
                println!("{sample:#?}");
            }
        }
        Err(e) => {
            eprintln!("sampling {} failed: {e}", telemetry.name());
            return ExitCode::FAILURE;
        }
    }
    let mut registry = Registry::with_prefix("edgelora");
    metrics::register(&mut registry, Arc::from(telemetry));
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        eprintln!("encoding metrics failed: {e}");
        return ExitCode::FAILURE;
    }
    print!("{text}");
    ExitCode::SUCCESS
}
