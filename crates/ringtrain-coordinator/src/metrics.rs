//! Operator metrics of a job in the Prometheus text format, and the HTTP server that
//! exposes them ([`serve_metrics`]).
//!
//! Everything here is a gauge of the job's current state except `ringtrain_epochs_total`;
//! the values come from registrations, heartbeats, epoch reports and the final reports, so
//! a scrape shows where the job is without asking any worker.

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::error::{CoordinatorError, Result};

/// Path of the metrics endpoint.
pub const METRICS_PATH: &str = "/metrics";

/// Where a job is; exported as `ringtrain_job_state{state="..."}` = 1 for the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Waiting for every worker to register.
    Rendezvous,
    /// The ring is formed and training runs.
    Running,
    Succeeded,
    Failed,
}

impl JobState {
    const ALL: [JobState; 4] = [
        JobState::Rendezvous,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Rendezvous => "rendezvous",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
        }
    }
}

type FloatGauge = Gauge<f64, AtomicU64>;
type StateLabels = Vec<(String, String)>;

/// The coordinator's metrics. Share one `Arc<Metrics>` between [`crate::CoordinatorConfig`]
/// (which updates it) and [`serve_metrics`] (which exposes it).
pub struct Metrics {
    registry: Registry,
    job_state: Family<StateLabels, Gauge>,
    workers_expected: Gauge,
    workers_registered: Gauge,
    workers_live: Gauge,
    generation: Gauge,
    membership_changes: Counter,
    step: Gauge,
    epoch: Gauge,
    epochs: Counter,
    checkpoint_epoch: Gauge,
    train_loss: FloatGauge,
    test_loss: FloatGauge,
    test_accuracy: FloatGauge,
    examples_per_second: FloatGauge,
    epoch_seconds: FloatGauge,
    allreduce_seconds: FloatGauge,
    allreduce_busbw: FloatGauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric under the `ringtrain_` prefix. Floats start at NaN ("not
    /// measured yet"), counts at 0, the state at `rendezvous`.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ringtrain");
        let m = Metrics {
            job_state: Family::default(),
            workers_expected: Gauge::default(),
            workers_registered: Gauge::default(),
            workers_live: Gauge::default(),
            generation: Gauge::default(),
            membership_changes: Counter::default(),
            step: Gauge::default(),
            epoch: Gauge::default(),
            epochs: Counter::default(),
            checkpoint_epoch: Gauge::default(),
            train_loss: FloatGauge::default(),
            test_loss: FloatGauge::default(),
            test_accuracy: FloatGauge::default(),
            examples_per_second: FloatGauge::default(),
            epoch_seconds: FloatGauge::default(),
            allreduce_seconds: FloatGauge::default(),
            allreduce_busbw: FloatGauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "job_state",
            "1 for the job's current state (rendezvous, running, succeeded, failed), 0 for the others",
            m.job_state.clone(),
        );
        let ints: [(&str, &str, &Gauge); 7] = [
            (
                "workers_expected",
                "Workers the job needs (the world size)",
                &m.workers_expected,
            ),
            ("workers_registered", "Workers that registered", &m.workers_registered),
            (
                "workers_live",
                "Registered workers neither lost nor failed",
                &m.workers_live,
            ),
            (
                "ring_generation",
                "Membership generation of the ring (elastic training: 0 for the first ring, one more per change)",
                &m.generation,
            ),
            ("step", "Optimizer steps taken (furthest rank)", &m.step),
            ("epoch", "Last completed epoch", &m.epoch),
            (
                "checkpoint_epoch",
                "Epoch of the last checkpoint the writer rank reported by heartbeat (0: none yet)",
                &m.checkpoint_epoch,
            ),
        ];
        for (name, help, gauge) in ints {
            registry.register(name, help, gauge.clone());
        }
        registry.register("epochs", "Epochs completed by this coordinator's job", m.epochs.clone());
        registry.register(
            "membership_changes",
            "Times the ring re-formed because workers left or joined (elastic training)",
            m.membership_changes.clone(),
        );
        let floats: [(&str, &str, &FloatGauge); 7] = [
            ("train_loss", "Training loss of the last epoch", &m.train_loss),
            ("test_loss", "Test loss after the last epoch", &m.test_loss),
            (
                "test_accuracy",
                "Test accuracy after the last epoch (classifiers)",
                &m.test_accuracy,
            ),
            (
                "examples_per_second",
                "Training examples per second in the last epoch (all workers)",
                &m.examples_per_second,
            ),
            ("epoch_seconds", "Wall time of the last epoch", &m.epoch_seconds),
            (
                "allreduce_seconds",
                "Time the writer rank spent in gradient all-reduces in the last epoch",
                &m.allreduce_seconds,
            ),
            (
                "allreduce_busbw_bytes_per_second",
                "Ring all-reduce bus bandwidth in the last epoch: 2 (n - 1) / n * bytes / time",
                &m.allreduce_busbw,
            ),
        ];
        for (name, help, gauge) in floats {
            gauge.set(f64::NAN);
            registry.register(name, help, gauge.clone());
        }
        let m = Metrics { registry, ..m };
        m.set_state(JobState::Rendezvous);
        m
    }

    /// The metrics in the OpenMetrics text format (what `/metrics` serves).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail; an encoder error would leave a partial page,
        // which a scraper rejects as a whole.
        if encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }

    pub(crate) fn set_state(&self, state: JobState) {
        for s in JobState::ALL {
            let labels = vec![("state".to_owned(), s.as_str().to_owned())];
            self.job_state.get_or_create(&labels).set(i64::from(s == state));
        }
    }

    pub(crate) fn set_workers(&self, expected: usize, registered: usize, live: usize) {
        self.workers_expected.set(count(expected as u64));
        self.workers_registered.set(count(registered as u64));
        self.workers_live.set(count(live as u64));
    }

    /// The ring re-formed as `generation`.
    pub(crate) fn reformed(&self, generation: u64) {
        self.generation.set(count(generation));
        self.membership_changes.inc();
    }

    pub(crate) fn set_progress(&self, step: u64, checkpoint_epoch: Option<u64>) {
        self.step.set(count(step));
        self.checkpoint_epoch.set(count(checkpoint_epoch.unwrap_or(0)));
    }

    pub(crate) fn record_epoch(&self, e: &EpochMetrics) {
        self.epochs.inc();
        self.epoch.set(count(e.epoch));
        self.train_loss.set(e.train_loss);
        self.test_loss.set(e.test_loss);
        self.test_accuracy.set(e.test_accuracy.unwrap_or(f64::NAN));
        self.examples_per_second.set(e.examples_per_sec);
        self.epoch_seconds.set(e.epoch_secs);
        self.allreduce_seconds.set(e.comm_secs);
        self.allreduce_busbw
            .set(bus_bandwidth(e.world, e.allreduce_bytes, e.comm_secs));
    }
}

/// What one epoch report contributes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EpochMetrics {
    pub epoch: u64,
    pub world: usize,
    pub train_loss: f64,
    pub test_loss: f64,
    pub test_accuracy: Option<f64>,
    pub examples_per_sec: f64,
    pub epoch_secs: f64,
    pub comm_secs: f64,
    pub allreduce_bytes: u64,
}

fn count(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Bus bandwidth of a ring all-reduce (the NCCL-tests convention): each rank sends and
/// receives 2 (n - 1) / n of the buffer, so this is comparable across world sizes. NaN when
/// nothing was measured; 0 for one worker (no traffic).
fn bus_bandwidth(world: usize, bytes: u64, secs: f64) -> f64 {
    if world <= 1 {
        return 0.0;
    }
    if bytes == 0 || secs <= 0.0 {
        return f64::NAN;
    }
    let n = world as f64;
    2.0 * (n - 1.0) / n * bytes as f64 / secs
}

/// Serves `GET /metrics` (OpenMetrics text) on `listener` until `shutdown` resolves.
pub async fn serve_metrics(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    metrics: Arc<Metrics>,
) -> Result<()> {
    use axum::http::header::CONTENT_TYPE;
    let page = move || {
        let metrics = metrics.clone();
        async move {
            (
                [(
                    CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                metrics.encode(),
            )
        }
    };
    let app = axum::Router::new().route(METRICS_PATH, axum::routing::get(page));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| CoordinatorError::Serve {
            reason: format!("metrics server: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, name: &str) -> Option<String> {
        text.lines()
            .find(|l| l.split([' ', '{']).next() == Some(name))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_owned)
    }

    #[test]
    fn a_fresh_registry_is_in_rendezvous_with_unmeasured_floats() {
        let m = Metrics::new();
        let text = m.encode();
        assert!(text.contains("ringtrain_job_state{state=\"rendezvous\"} 1"), "{text}");
        assert!(text.contains("ringtrain_job_state{state=\"running\"} 0"), "{text}");
        assert_eq!(value(&text, "ringtrain_train_loss").as_deref(), Some("NaN"));
        assert_eq!(value(&text, "ringtrain_epochs_total").as_deref(), Some("0"));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn an_epoch_report_sets_the_gauges_and_the_bus_bandwidth() {
        let m = Metrics::new();
        m.set_state(JobState::Running);
        m.record_epoch(&EpochMetrics {
            epoch: 3,
            world: 4,
            train_loss: 0.5,
            test_loss: 0.25,
            test_accuracy: Some(0.75),
            examples_per_sec: 1000.0,
            epoch_secs: 2.0,
            comm_secs: 0.5,
            allreduce_bytes: 1_000_000,
        });
        let text = m.encode();
        assert_eq!(value(&text, "ringtrain_epoch").as_deref(), Some("3"));
        assert_eq!(value(&text, "ringtrain_epochs_total").as_deref(), Some("1"));
        assert_eq!(value(&text, "ringtrain_train_loss").as_deref(), Some("0.5"));
        assert_eq!(value(&text, "ringtrain_test_accuracy").as_deref(), Some("0.75"));
        // 2 * 3/4 * 1 MB / 0.5 s
        assert_eq!(
            value(&text, "ringtrain_allreduce_busbw_bytes_per_second").as_deref(),
            Some("3000000.0")
        );
        assert!(text.contains("ringtrain_job_state{state=\"running\"} 1"), "{text}");
        assert!(text.contains("ringtrain_job_state{state=\"rendezvous\"} 0"), "{text}");
    }

    #[test]
    fn a_re_formed_ring_shows_its_generation_and_the_count_of_changes() {
        let m = Metrics::new();
        assert_eq!(value(&m.encode(), "ringtrain_ring_generation").as_deref(), Some("0"));
        m.reformed(1);
        m.reformed(2);
        let text = m.encode();
        assert_eq!(value(&text, "ringtrain_ring_generation").as_deref(), Some("2"));
        assert_eq!(value(&text, "ringtrain_membership_changes_total").as_deref(), Some("2"));
    }

    #[test]
    fn bus_bandwidth_of_one_worker_is_zero_and_of_nothing_measured_nan() {
        assert_eq!(bus_bandwidth(1, 100, 1.0), 0.0);
        assert!(bus_bandwidth(2, 0, 1.0).is_nan());
        assert_eq!(bus_bandwidth(2, 100, 1.0), 100.0);
    }
}
