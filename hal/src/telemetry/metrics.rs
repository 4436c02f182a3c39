//! Prometheus export of GPU telemetry. A [`Collector`] samples the backend on every scrape, so the
//! numbers are as fresh as the scrape and nothing polls the GPU between scrapes.
//!
//! Families (before the registry's prefix), each labelled `gpu` (index), `name` and `source`:
//!
//! | family                          | unit                   |
//! |---------------------------------|------------------------|
//! | `gpu_memory_used_bytes`         | bytes                  |
//! | `gpu_memory_free_bytes`         | bytes                  |
//! | `gpu_memory_total_bytes`        | bytes                  |
//! | `gpu_temperature_celsius`       | °C                     |
//! | `gpu_power_watts`               | W                      |
//! | `gpu_utilization_ratio`         | 0 to 1                 |
//! | `gpu_sm_clock_hertz`            | Hz                     |
//! | `gpu_memory_clock_hertz`        | Hz                     |
//!
//! plus `gpu_telemetry_up{source}`: 1 when the last sample succeeded, 0 when it failed (the
//! failure is logged and the other families are left out of that scrape). A reading the backend
//! lacks is left out, never exported as 0.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use super::{GpuSample, GpuTelemetry};

/// Registers a collector for `telemetry` with `registry`; the registry's prefix (say `edgelora`)
/// is put in front of every family name.
pub fn register(registry: &mut Registry, telemetry: Arc<dyn GpuTelemetry>) {
    registry.register_collector(Box::new(GpuCollector { telemetry }));
}

/// The collector [`register`] installs.
#[derive(Debug)]
pub struct GpuCollector {
    telemetry: Arc<dyn GpuTelemetry>,
}

impl GpuCollector {
    pub fn new(telemetry: Arc<dyn GpuTelemetry>) -> Self {
        Self { telemetry }
    }
}

struct Family {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    value: fn(&GpuSample) -> Option<Value>,
}

/// Counts of bytes stay integers in the text format; the rest are floats.
#[derive(Debug, Clone, Copy)]
enum Value {
    Integer(u64),
    Float(f64),
}

impl Value {
    fn encode(self, encoder: prometheus_client::encoding::MetricEncoder) -> std::fmt::Result {
        match self {
            Value::Integer(v) => ConstGauge::new(v).encode(encoder),
            Value::Float(v) => ConstGauge::new(v).encode(encoder),
        }
    }
}

fn families() -> [Family; 8] {
    [
        Family {
            name: "gpu_memory_used",
            help: "GPU memory in use (Jetson: system memory in use, it is shared)",
            unit: Some(Unit::Bytes),
            value: |s| s.memory_used_bytes.map(Value::Integer),
        },
        Family {
            name: "gpu_memory_free",
            help: "GPU memory free (Jetson: system memory available)",
            unit: Some(Unit::Bytes),
            value: |s| s.memory_free_bytes.map(Value::Integer),
        },
        Family {
            name: "gpu_memory_total",
            help: "GPU memory in all (Jetson: system memory)",
            unit: Some(Unit::Bytes),
            value: |s| s.memory_total_bytes.map(Value::Integer),
        },
        Family {
            name: "gpu_temperature",
            help: "GPU temperature",
            unit: Some(Unit::Celsius),
            value: |s| s.temperature_c.map(Value::Float),
        },
        Family {
            name: "gpu_power",
            help: "Power drawn by the GPU (Jetson: the INA3221 rails feeding it)",
            unit: Some(Unit::Other("watts".to_owned())),
            value: |s| s.power_mw.map(|mw| Value::Float(mw as f64 / 1000.0)),
        },
        Family {
            name: "gpu_utilization",
            help: "Share of the last sampling period the GPU was busy",
            unit: Some(Unit::Other("ratio".to_owned())),
            value: |s| s.utilization_pct.map(|pct| Value::Float(pct / 100.0)),
        },
        Family {
            name: "gpu_sm_clock",
            help: "Current SM (graphics) clock",
            unit: Some(Unit::Other("hertz".to_owned())),
            value: |s| {
                s.sm_clock_mhz
                    .map(|mhz| Value::Integer(u64::from(mhz) * 1_000_000))
            },
        },
        Family {
            name: "gpu_memory_clock",
            help: "Current memory clock",
            unit: Some(Unit::Other("hertz".to_owned())),
            value: |s| {
                s.mem_clock_mhz
                    .map(|mhz| Value::Integer(u64::from(mhz) * 1_000_000))
            },
        },
    ]
}

impl Collector for GpuCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let source = self.telemetry.name().to_owned();
        let samples = match self.telemetry.sample() {
            Ok(samples) => Some(samples),
            Err(e) => {
                tracing::warn!(source = %source, error = %e, "GPU telemetry sample failed");
                None
            }
        };
        let up = ConstGauge::new(i64::from(samples.is_some()));
        let labels = [("source", source.as_str())];
        let mut family = encoder.encode_descriptor(
            "gpu_telemetry_up",
            "1 if the last GPU telemetry sample succeeded",
            None,
            up.metric_type(),
        )?;
        up.encode(family.encode_family(&labels)?)?;

        let Some(samples) = samples else {
            return Ok(());
        };
        for family in families() {
            let values: Vec<(Vec<(&str, String)>, Value)> = samples
                .iter()
                .filter_map(|s| {
                    let value = (family.value)(s)?;
                    let labels = vec![
                        ("gpu", s.index.to_string()),
                        ("name", s.name.clone()),
                        ("source", s.source.to_owned()),
                    ];
                    Some((labels, value))
                })
                .collect();
            if values.is_empty() {
                continue;
            }
            let mut metric = encoder.encode_descriptor(
                family.name,
                family.help,
                family.unit.as_ref(),
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (labels, value) in &values {
                value.encode(metric.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}
