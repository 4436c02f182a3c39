//! Prometheus metrics of the engine, labelled by the model a request asked for (the base model or
//! an adapter id), so an operator sees every skill's traffic and latency separately.
//!
//! The scheduler records into these from the engine thread; `GET /metrics` encodes the registry
//! they live in (with the board's GPU telemetry beside them when the hal finds some).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishLabel {
    pub model: String,
    pub finish: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdapterLabel {
    pub adapter: String,
}

/// What a pool page holds: `adapters`, `kv` or `free`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    pub held_by: String,
}

/// Which reader streams adapter packs (`io_uring` or `pread`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StorageLabel {
    pub reader: String,
}

type HistFamily = Family<ModelLabel, Histogram, fn() -> Histogram>;
type AdapterHistFamily = Family<AdapterLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Every engine metric; cheap to clone (the metrics are shared atomics).
#[derive(Clone, Debug)]
pub struct EngineMetrics {
    pub requests: Family<FinishLabel, Counter>,
    pub prompt_tokens: Family<ModelLabel, Counter>,
    pub generated_tokens: Family<ModelLabel, Counter>,
    pub ttft: HistFamily,
    pub itl: HistFamily,
    pub queue_depth: Gauge,
    pub running: Gauge,
    pub kv_pages_free: Gauge,
    pub kv_pages_used: Gauge,
    pub preemptions: Counter,
    pub steps: Counter,
    /// Requests whose adapter was resident when asked for.
    pub adapter_hits: Family<AdapterLabel, Counter>,
    /// Requests that had to wait for their adapter to load.
    pub adapter_misses: Family<AdapterLabel, Counter>,
    /// Pack read + decode, per adapter.
    pub adapter_load_seconds: AdapterHistFamily,
    pub adapter_bytes_read: Family<AdapterLabel, Counter>,
    pub adapter_evictions: Family<AdapterLabel, Counter>,
    pub adapter_load_failures: Family<AdapterLabel, Counter>,
    pub adapters_resident: Gauge,
    /// The one page pool, by what holds each page.
    pub pool_pages: Family<PoolLabel, Gauge>,
    /// 1 for the reader in use.
    pub storage_reader: Family<StorageLabel, Gauge>,
    /// Attribution events in the ledger.
    pub ledger_events: Gauge,
    /// Ledger segments found damaged (quarantined or cut) since they were last repaired.
    pub ledger_damaged_segments: Gauge,
    /// The ledger's sync to the fleet collector.
    pub sync: crate::sync::SyncMetrics,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            prompt_tokens: Family::default(),
            generated_tokens: Family::default(),
            ttft: Family::new_with_constructor(latency_histogram),
            itl: Family::new_with_constructor(latency_histogram),
            queue_depth: Gauge::default(),
            running: Gauge::default(),
            kv_pages_free: Gauge::default(),
            kv_pages_used: Gauge::default(),
            preemptions: Counter::default(),
            steps: Counter::default(),
            adapter_hits: Family::default(),
            adapter_misses: Family::default(),
            adapter_load_seconds: Family::new_with_constructor(latency_histogram),
            adapter_bytes_read: Family::default(),
            adapter_evictions: Family::default(),
            adapter_load_failures: Family::default(),
            adapters_resident: Gauge::default(),
            pool_pages: Family::default(),
            storage_reader: Family::default(),
            ledger_events: Gauge::default(),
            ledger_damaged_segments: Gauge::default(),
            sync: Default::default(),
        }
    }
}

impl EngineMetrics {
    /// Registers every metric under `registry` (whose prefix names them `edgelora_…`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "requests",
            "Finished requests by model (base or adapter id) and finish reason",
            self.requests.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens prefilled, by model",
            self.prompt_tokens.clone(),
        );
        registry.register(
            "generated_tokens",
            "Tokens generated, by model",
            self.generated_tokens.clone(),
        );
        registry.register_with_unit(
            "time_to_first_token",
            "From a request's arrival at the engine to its first token, by model",
            Unit::Seconds,
            self.ttft.clone(),
        );
        registry.register_with_unit(
            "inter_token_latency",
            "Between consecutive tokens of a request, by model",
            Unit::Seconds,
            self.itl.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting for admission",
            self.queue_depth.clone(),
        );
        registry.register(
            "running_sequences",
            "Sequences in the running batch",
            self.running.clone(),
        );
        registry.register(
            "kv_pages_free",
            "KV cache pages free",
            self.kv_pages_free.clone(),
        );
        registry.register(
            "kv_pages_used",
            "KV cache pages holding tokens",
            self.kv_pages_used.clone(),
        );
        registry.register(
            "preemptions",
            "Sequences preempted (pages freed, recomputed later)",
            self.preemptions.clone(),
        );
        registry.register("steps", "Forward steps run", self.steps.clone());
        registry.register(
            "adapter_hits",
            "Requests whose adapter was resident when they arrived, by adapter",
            self.adapter_hits.clone(),
        );
        registry.register(
            "adapter_misses",
            "Requests whose adapter was not resident when they arrived (loading or to be loaded), by adapter",
            self.adapter_misses.clone(),
        );
        registry.register_with_unit(
            "adapter_load",
            "Adapter pack read and decode time, by adapter",
            Unit::Seconds,
            self.adapter_load_seconds.clone(),
        );
        registry.register_with_unit(
            "adapter_read",
            "Adapter pack bytes read from storage, by adapter",
            Unit::Bytes,
            self.adapter_bytes_read.clone(),
        );
        registry.register(
            "adapter_evictions",
            "Adapters evicted from the pool, by adapter",
            self.adapter_evictions.clone(),
        );
        registry.register(
            "adapter_load_failures",
            "Adapter loads that failed (I/O error, corrupt pack), by adapter",
            self.adapter_load_failures.clone(),
        );
        registry.register(
            "adapters_resident",
            "Adapters resident in the pool",
            self.adapters_resident.clone(),
        );
        registry.register(
            "pool_pages",
            "Pages of the one pool shared by adapters and KV, by holder (adapters, kv, free)",
            self.pool_pages.clone(),
        );
        registry.register(
            "storage_reader",
            "The reader that streams adapter packs (1 for the one in use: io_uring or pread)",
            self.storage_reader.clone(),
        );
        registry.register(
            "ledger_events",
            "Attribution events in the ledger",
            self.ledger_events.clone(),
        );
        registry.register(
            "ledger_damage",
            "Damage the attribution ledger found at open (quarantined segments): non-zero needs an operator",
            self.ledger_damaged_segments.clone(),
        );
        self.sync.register(registry);
    }

    pub fn adapter(id: &str) -> AdapterLabel {
        AdapterLabel {
            adapter: id.to_string(),
        }
    }

    pub fn pool(held_by: &str) -> PoolLabel {
        PoolLabel {
            held_by: held_by.to_string(),
        }
    }

    pub fn label(model: &str) -> ModelLabel {
        ModelLabel {
            model: model.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_encode_with_model_labels() {
        let m = EngineMetrics::default();
        let mut reg = Registry::with_prefix("edgelora");
        m.register(&mut reg);
        m.generated_tokens
            .get_or_create(&EngineMetrics::label("alpha"))
            .inc_by(3);
        m.ttft
            .get_or_create(&EngineMetrics::label("alpha"))
            .observe(0.02);
        m.requests
            .get_or_create(&FinishLabel {
                model: "base".into(),
                finish: "stop".into(),
            })
            .inc();
        m.kv_pages_free.set(7);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.contains("edgelora_generated_tokens_total{model=\"alpha\"} 3"),
            "{out}"
        );
        assert!(
            out.contains("edgelora_requests_total{model=\"base\",finish=\"stop\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("edgelora_time_to_first_token_seconds_count{model=\"alpha\"} 1"),
            "{out}"
        );
        assert!(out.contains("edgelora_kv_pages_free 7"), "{out}");
    }
}
