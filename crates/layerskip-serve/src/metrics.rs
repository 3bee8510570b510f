//! The server's Prometheus metrics (`GET /metrics`, text exposition format), kept with
//! `prometheus-client`.

use std::sync::atomic::AtomicU64;

use layerskip_infer::GenerationStats;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Counters, gauges and histograms of the server.
pub struct Metrics {
    registry: Registry,
    requests: Counter,
    rejected: Counter,
    cancelled: Counter,
    tokens: Counter,
    drafted: Counter,
    accepted: Counter,
    generation_seconds: Counter<f64, AtomicU64>,
    queue_depth: Gauge,
    tokens_per_second: Gauge<f64, AtomicU64>,
    acceptance_rate: Gauge<f64, AtomicU64>,
    time_to_first_token: Histogram,
    queue_wait: Histogram,
    batch_size: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let seconds = || Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let mut m = Self {
            requests: Counter::default(),
            rejected: Counter::default(),
            cancelled: Counter::default(),
            tokens: Counter::default(),
            drafted: Counter::default(),
            accepted: Counter::default(),
            generation_seconds: Counter::default(),
            queue_depth: Gauge::default(),
            tokens_per_second: Gauge::default(),
            acceptance_rate: Gauge::default(),
            time_to_first_token: seconds(),
            queue_wait: seconds(),
            batch_size: Histogram::new([1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0]),
            registry: Registry::with_prefix("layerskip"),
        };
        let registry = &mut m.registry;
        registry.register(
            "requests",
            "Generation requests received",
            m.requests.clone(),
        );
        registry.register(
            "requests_rejected",
            "Requests answered with a 4xx error",
            m.rejected.clone(),
        );
        registry.register(
            "requests_cancelled",
            "Generations cancelled because the client disconnected",
            m.cancelled.clone(),
        );
        registry.register("tokens_generated", "Tokens generated", m.tokens.clone());
        registry.register(
            "draft_tokens",
            "Tokens drafted by self-speculation",
            m.drafted.clone(),
        );
        registry.register(
            "accepted_draft_tokens",
            "Drafted tokens the full model accepted",
            m.accepted.clone(),
        );
        registry.register(
            "generation_seconds",
            "Time spent generating",
            m.generation_seconds.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting for the engine",
            m.queue_depth.clone(),
        );
        registry.register(
            "tokens_per_second",
            "Tokens generated per second of generation, since the start",
            m.tokens_per_second.clone(),
        );
        registry.register(
            "acceptance_rate",
            "Accepted / drafted tokens of self-speculation, since the start",
            m.acceptance_rate.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Time from the start of a generation to its first token",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time a request waited in the queue",
            m.queue_wait.clone(),
        );
        registry.register(
            "batch_size",
            "Generations decoded together, per batched step",
            m.batch_size.clone(),
        );
        m
    }
}

impl Metrics {
    /// A request arrived (and is queued).
    pub fn received(&self) {
        self.requests.inc();
        self.queue_depth.inc();
    }

    /// A request was refused before reaching the queue.
    pub fn refused(&self) {
        self.requests.inc();
        self.rejected.inc();
    }

    /// The engine took a request from the queue.
    pub fn dequeued(&self) {
        self.queue_depth.dec();
    }

    /// The engine refused a queued request (invalid for this model).
    pub fn rejected(&self) {
        self.rejected.inc();
    }

    /// A client disconnected before its generation finished.
    pub fn cancelled(&self) {
        self.cancelled.inc();
    }

    /// Seconds a request waited before its generation began.
    pub fn queue_wait(&self, seconds: f64) {
        self.queue_wait.observe(seconds);
    }

    /// A batched step decoded `generations` generations together.
    pub fn batch_step(&self, generations: usize) {
        self.batch_size.observe(generations as f64);
    }

    /// A generation finished.
    pub fn finished(&self, stats: &GenerationStats) {
        self.tokens.inc_by(stats.new_tokens as u64);
        self.drafted.inc_by(stats.drafted as u64);
        self.accepted.inc_by(stats.accepted as u64);
        self.generation_seconds.inc_by(stats.total_ms / 1e3);
        self.time_to_first_token
            .observe(stats.time_to_first_token_ms / 1e3);
        let seconds = self.generation_seconds.get();
        if seconds > 0.0 {
            self.tokens_per_second
                .set(self.tokens.get() as f64 / seconds);
        }
        if self.drafted.get() > 0 {
            self.acceptance_rate
                .set(self.accepted.get() as f64 / self.drafted.get() as f64);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
