//! Prometheus metrics, served at `/metrics` in the OpenMetrics text format
//! (which Prometheus scrapes natively).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::borrow::Cow;
use std::sync::atomic::AtomicU64;

/// Labels of the HTTP request histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The matched route (never the raw path: unbounded label values would
    /// let any client blow up the series count); static for the known
    /// routes, so the hot path does not allocate it.
    pub route: Cow<'static, str>,
    pub status: u16,
}

/// Labels of the peer error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorKind {
    pub kind: &'static str,
}

/// Labels of the peer refusal counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Why: `overflow`, `above_first_hand`, `below_known`, `too_many`, `too_large`,
    /// `busy`, `malformed`, `bad_name`, `duplicate`, `missing_self`.
    pub reason: &'static str,
}

/// Every `kind` of `tally_peer_errors_total` (`peers::client::FetchError::kind`).
/// Exported at 0 from the start, so alerts and dashboards see the series
/// before the first error (Prometheus: "avoid missing metrics").
pub const PEER_ERROR_KINDS: [&str; 6] = [
    "timeout",
    "connect",
    "status",
    "too_large",
    "refused",
    "invalid",
];

/// Every `reason` of `tally_peer_refusals_total` (the `reason()` of the
/// wire, merge and dispute errors, and the peer route's own refusals),
/// exported at 0 from the start like [`PEER_ERROR_KINDS`].
pub const REFUSAL_REASONS: [&str; 10] = [
    "overflow",
    "above_first_hand",
    "below_known",
    "too_many",
    "too_large",
    "busy",
    "malformed",
    "bad_name",
    "duplicate",
    "missing_self",
];

/// Labels of `tally_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
}

/// Every metric tally exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Visits this pod has counted (durably), across restarts.
    pub visits: Counter,
    /// Request latency by route and status.
    pub http_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Store commit (write + sync) latency.
    pub commit_duration: Histogram,
    /// Visits sharing one commit; shows group commit at work.
    pub commit_batch: Histogram,
    /// Commits that failed (disk full, read-only volume, I/O error).
    pub commit_failures: Counter,
    /// `fdatasync` calls of the counter file (per visit: the group-commit
    /// ratio the benchmark reports).
    pub store_fdatasyncs: Counter,
    /// Visits queued for or in a commit.
    pub store_queue_depth: Gauge,
    /// Age of the oldest visit in the commit in progress (0 when idle);
    /// updated at scrape time.
    pub store_oldest_pending_seconds: Gauge<f64, AtomicU64>,
    /// 1 while the store writes and no commit is stuck, else 0; updated at
    /// scrape time.
    pub store_healthy: Gauge,
    /// 1 while the data volume has no free block (visits answered 503),
    /// else 0.
    pub store_volume_full: Gauge,
    /// Duration of a fan-out: a round to every sibling, or a gossip to a few.
    pub fanout_duration: Histogram,
    /// Peer fetches that failed, by kind (timeout, connect, status, body…).
    pub peer_errors: Family<ErrorKind, Counter>,
    /// Peer fetches sent (each sibling once per fan-out).
    pub peer_fetches: Counter,
    /// Members in the last DNS answer, this pod included.
    pub members: Gauge,
    /// Member lookups that failed (timeout, SERVFAIL) or found no member
    /// (NXDOMAIN): what the discovery alert watches.
    pub discovery_failures: Counter,
    /// `/visits/total` requests answered by joining a fan-out in flight.
    pub coalesced: Counter,
    /// The last cluster total computed.
    pub total: Gauge,
    /// Requests to the peer route with a missing or wrong token.
    pub peer_auth_failures: Counter,
    /// Counters (and tombstones) in the cluster state: bounded by the
    /// entry limit that fits the largest peer body.
    pub entries: Gauge,
    /// Peer states (or relayed values in them) refused, by reason.
    pub refusals: Family<Reason, Counter>,
    /// Writes of `peers.state` that failed.
    pub persist_failures: Counter,
    /// 1 while what this pod knows of the others is not on its volume
    /// after a failed write (retried until it succeeds; readiness fails).
    pub persist_pending: Gauge,
    /// Peer states this pod served to siblings (`GET` on the peer route).
    pub peer_served: Counter,
    /// Body bytes of those answers: what peer traffic costs (`scripts/bench scale`).
    pub peer_bytes_served: Counter,
    /// Always 1, labelled with the version: dashboards and alerts join on it
    /// to see which release each pod runs (mixed versions mid-rollout).
    pub build_info: Family<BuildLabels, Gauge>,
}

fn latency_histogram() -> Histogram {
    // 50 µs … ~13 s
    Histogram::new(exponential_buckets(0.00005, 2.0, 19))
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tally");
        let metrics = Metrics {
            visits: Counter::default(),
            http_duration: Family::new_with_constructor(latency_histogram),
            commit_duration: latency_histogram(),
            commit_batch: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            commit_failures: Counter::default(),
            store_fdatasyncs: Counter::default(),
            store_queue_depth: Gauge::default(),
            store_oldest_pending_seconds: Gauge::default(),
            store_healthy: Gauge::default(),
            store_volume_full: Gauge::default(),
            fanout_duration: latency_histogram(),
            peer_errors: Family::default(),
            peer_fetches: Counter::default(),
            members: Gauge::default(),
            discovery_failures: Counter::default(),
            coalesced: Counter::default(),
            total: Gauge::default(),
            peer_auth_failures: Counter::default(),
            entries: Gauge::default(),
            refusals: Family::default(),
            persist_failures: Counter::default(),
            persist_pending: Gauge::default(),
            peer_served: Counter::default(),
            peer_bytes_served: Counter::default(),
            build_info: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "visits",
            "Visits counted by this pod",
            metrics.visits.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request duration by route and status",
            metrics.http_duration.clone(),
        );
        registry.register(
            "store_commit_duration_seconds",
            "Time to write and sync one commit of the visit counter",
            metrics.commit_duration.clone(),
        );
        registry.register(
            "store_commit_batch_size",
            "Visits acknowledged by one commit (group commit)",
            metrics.commit_batch.clone(),
        );
        registry.register(
            "store_commit_failures",
            "Commits that failed; visits in them were answered 503",
            metrics.commit_failures.clone(),
        );
        registry.register(
            "store_fdatasyncs",
            "fdatasync calls on the counter file",
            metrics.store_fdatasyncs.clone(),
        );
        registry.register(
            "store_queue_depth",
            "Visits queued for or in a commit",
            metrics.store_queue_depth.clone(),
        );
        registry.register(
            "store_oldest_pending_seconds",
            "Age of the oldest visit waiting in the commit in progress",
            metrics.store_oldest_pending_seconds.clone(),
        );
        registry.register(
            "store_healthy",
            "1 while the store writes and no commit is stuck past commit_timeout_ms, else 0",
            metrics.store_healthy.clone(),
        );
        registry.register(
            "store_volume_full",
            "1 while the data volume has no free block left, so visits are answered 503, else 0",
            metrics.store_volume_full.clone(),
        );
        registry.register(
            "fanout_duration_seconds",
            "Time to ask siblings for their state (every one in a round, a few in a gossip)",
            metrics.fanout_duration.clone(),
        );
        registry.register(
            "peer_errors",
            "Failed sibling fetches by kind",
            metrics.peer_errors.clone(),
        );
        registry.register(
            "peer_fetches",
            "Sibling fetches sent",
            metrics.peer_fetches.clone(),
        );
        registry.register(
            "members",
            "StatefulSet members in the last DNS answer",
            metrics.members.clone(),
        );
        registry.register(
            "discovery_failures",
            "Member lookups (SRV on the headless Service) that failed or found no member",
            metrics.discovery_failures.clone(),
        );
        registry.register(
            "total_requests_coalesced",
            "/visits/total requests that shared a fan-out already in flight",
            metrics.coalesced.clone(),
        );
        registry.register(
            "cluster_visits",
            "Last computed cluster-wide total",
            metrics.total.clone(),
        );
        registry.register(
            "peer_auth_failures",
            "Peer requests refused for a missing or wrong token",
            metrics.peer_auth_failures.clone(),
        );
        registry.register(
            "cluster_entries",
            "Counters and tombstones in the cluster state this pod holds",
            metrics.entries.clone(),
        );
        registry.register(
            "peer_refusals",
            "Peer states, or relayed values in them, refused by reason",
            metrics.refusals.clone(),
        );
        registry.register(
            "peers_state_persist_failures",
            "Writes of peers.state that failed",
            metrics.persist_failures.clone(),
        );
        registry.register(
            "peers_state_persist_pending",
            "1 while what this pod knows of the others is not on its volume after a failed write",
            metrics.persist_pending.clone(),
        );
        registry.register(
            "peer_requests_served",
            "Peer states served to siblings",
            metrics.peer_served.clone(),
        );
        registry.register(
            "peer_bytes_served",
            "Body bytes of the peer states served to siblings",
            metrics.peer_bytes_served.clone(),
        );
        for kind in PEER_ERROR_KINDS {
            let _ = metrics.peer_errors.get_or_create(&ErrorKind { kind });
        }
        for reason in REFUSAL_REASONS {
            let _ = metrics.refusals.get_or_create(&Reason { reason });
        }
        metrics
            .build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "build_info",
            "Always 1; the version label says which tally this pod runs",
            metrics.build_info.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// Counts one refusal of peer data.
    pub fn refusal(&self, reason: &'static str) {
        self.refusals.get_or_create(&Reason { reason }).inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_family() {
        let m = Metrics::new();
        m.visits.inc_by(3);
        m.http_duration
            .get_or_create(&RouteLabels {
                route: "/".into(),
                status: 200,
            })
            .observe(0.001);
        m.refusal("overflow");
        let text = m.encode();
        for name in [
            "tally_visits_total 3",
            "tally_http_request_duration_seconds_bucket{le=",
            "route=\"/\",status=\"200\"",
            "tally_store_commit_duration_seconds",
            "tally_store_commit_batch_size",
            "tally_fanout_duration_seconds",
            "tally_members",
            "tally_discovery_failures_total",
            "tally_total_requests_coalesced_total",
            "tally_cluster_visits",
            "tally_store_fdatasyncs_total",
            "tally_store_queue_depth",
            "tally_store_oldest_pending_seconds",
            "tally_store_healthy",
            "tally_store_volume_full",
            "tally_cluster_entries",
            "tally_peers_state_persist_failures_total",
            "tally_peer_refusals_total{reason=\"overflow\"} 1",
            "tally_peer_requests_served_total",
            "tally_peer_bytes_served_total",
            concat!(
                "tally_build_info{version=\"",
                env!("CARGO_PKG_VERSION"),
                "\"} 1"
            ),
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    #[test]
    fn labelled_counters_start_at_zero_for_every_known_label() {
        use crate::merge::MergeError;
        use crate::peers::client::FetchError;
        use crate::peers::wire::StateError;
        let text = Metrics::new().encode();
        for kind in PEER_ERROR_KINDS {
            let series = format!("tally_peer_errors_total{{kind=\"{kind}\"}} 0");
            assert!(text.contains(&series), "missing {series} in\n{text}");
        }
        for reason in REFUSAL_REASONS {
            let series = format!("tally_peer_refusals_total{{reason=\"{reason}\"}} 0");
            assert!(text.contains(&series), "missing {series} in\n{text}");
        }
        // The lists hold every label the code can produce.
        let fetch_errors = [
            FetchError::Timeout(1),
            FetchError::Connect(String::new()),
            FetchError::Status(http::StatusCode::BAD_GATEWAY),
            FetchError::TooLarge,
            FetchError::Refused(StateError::MissingSelf(String::new())),
            FetchError::Invalid(String::new()),
        ];
        for e in &fetch_errors {
            assert!(
                PEER_ERROR_KINDS.contains(&e.kind()),
                "{} not listed",
                e.kind()
            );
        }
        let state_errors = [
            StateError::Malformed(String::new()),
            StateError::BadName(String::new()),
            StateError::Duplicate {
                sender: String::new(),
                entry: String::new(),
            },
            StateError::MissingSelf(String::new()),
            StateError::Overflow(String::new()),
        ];
        for e in &state_errors {
            assert!(
                REFUSAL_REASONS.contains(&e.reason()),
                "{} not listed",
                e.reason()
            );
        }
        let merge = MergeError::Overflow(String::new());
        assert!(REFUSAL_REASONS.contains(&merge.reason()));
    }
}
