//! Prometheus metrics, prefix `countersign_`, base units, bounded labels:
//! policy names and fixed outcome words, never paths or subjects.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// All of the gateway's metrics, in a registry of its own so that several
/// gateways in one process (tests) do not share counts. pingora's own metrics
/// live in the default registry and are appended when rendering.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Calls by policy (`none` when unmatched) and outcome.
    pub calls: IntCounterVec,
    /// Finished approvals by policy and result: approved, denied, expired, error, cancelled.
    pub approvals: IntCounterVec,
    /// Approvals this process asked for or resumed that are still pending.
    pub pending_approvals: IntGauge,
    /// Agent connections held open waiting for an approval.
    pub held_calls: IntGauge,
    /// Approvals this process adopted from a process whose lease ran out
    /// (it died, or lost the store for longer than a lease).
    pub lease_takeovers: IntCounter,
    /// Times this process's heartbeat lapsed (a pause, or the store
    /// unreachable for longer than a lease): it stopped polling until the
    /// store answered again.
    pub heartbeat_lapses: IntCounter,
    /// Approved calls this process marked `outcome_unknown`: sent, or maybe
    /// sent, with no answer recorded (the forwarder died, or the upstream's
    /// answer was lost).
    pub outcome_unknown: IntCounter,
    /// Retried calls that attached to the approval already in flight or done.
    pub retries_attached: IntCounterVec,
    /// What policies in `mode: shadow` would have done (`hold`, `pass`,
    /// `refuse`, or `unread`: a body it would need was not read).
    pub shadow_decisions: IntCounterVec,
    /// Seconds from the approval request to its result.
    pub approval_wait: HistogramVec,
    /// Calls to the authorization server by endpoint and result.
    pub ciba_requests: IntCounterVec,
    /// Seconds from sending to the upstream to the end of its response.
    pub upstream_duration: HistogramVec,
    /// Ping-mode notifications received, by result: accepted, unknown,
    /// wrong_token, no_token, malformed.
    pub ciba_notifications: IntCounterVec,
    /// Configuration reloads by result: ok, error, restart_required.
    pub config_reloads: IntCounterVec,
    /// Unix time of the last configuration load that took effect (the start,
    /// or the last `ok` reload).
    pub config_last_good_load: IntGauge,
    /// Seconds per approval-store operation, by operation.
    pub store_duration: HistogramVec,
    /// Approval-store operations that failed (unreachable, timed out), by
    /// operation.
    pub store_errors: IntCounterVec,
}

/// Buckets up to ten minutes: people answer in seconds to minutes.
const APPROVAL_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0,
];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let calls = IntCounterVec::new(
            Opts::new(
                "countersign_calls_total",
                "Calls handled, by policy and outcome.",
            ),
            &["policy", "outcome"],
        )
        .expect("valid metric");
        let approvals = IntCounterVec::new(
            Opts::new(
                "countersign_approvals_total",
                "Approval requests finished, by policy and result.",
            ),
            &["policy", "result"],
        )
        .expect("valid metric");
        let pending_approvals = IntGauge::new(
            "countersign_approvals_pending",
            "Approvals this gateway is waiting on for a person's answer.",
        )
        .expect("valid metric");
        let held_calls = IntGauge::new(
            "countersign_calls_held",
            "Agent connections held open waiting for an approval.",
        )
        .expect("valid metric");
        let lease_takeovers = IntCounter::new(
            "countersign_lease_takeovers_total",
            "Pending approvals this gateway took over from a gateway whose lease ran out.",
        )
        .expect("valid metric");
        let heartbeat_lapses = IntCounter::new(
            "countersign_heartbeat_lapses_total",
            "Times this gateway's heartbeat lapsed (paused, or the store unreachable for longer than a lease) and it stopped polling until the store answered.",
        )
        .expect("valid metric");
        let outcome_unknown = IntCounter::new(
            "countersign_outcome_unknown_total",
            "Approved calls this gateway marked outcome_unknown: maybe sent, no answer recorded; never sent again.",
        )
        .expect("valid metric");
        let shadow_decisions = IntCounterVec::new(
            Opts::new(
                "countersign_shadow_decisions_total",
                "Calls a policy in shadow mode matched, by what it would have done (hold, pass, refuse, unread); nobody was asked",
            ),
            &["policy", "decision"],
        )
        .expect("valid metric");
        let retries_attached = IntCounterVec::new(
            Opts::new(
                "countersign_retries_attached_total",
                "Retried calls that attached to their approval instead of asking again, by policy.",
            ),
            &["policy"],
        )
        .expect("valid metric");
        let approval_wait = HistogramVec::new(
            HistogramOpts::new(
                "countersign_approval_wait_seconds",
                "Time from asking the person to their answer, by result.",
            )
            .buckets(APPROVAL_BUCKETS.to_vec()),
            &["result"],
        )
        .expect("valid metric");
        let ciba_requests = IntCounterVec::new(
            Opts::new(
                "countersign_ciba_requests_total",
                "Requests to the authorization server, by endpoint and result.",
            ),
            &["endpoint", "result"],
        )
        .expect("valid metric");
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "countersign_upstream_request_duration_seconds",
                "Time the upstream took to answer a forwarded call, by upstream.",
            ),
            &["upstream"],
        )
        .expect("valid metric");
        let ciba_notifications = IntCounterVec::new(
            Opts::new(
                "countersign_ciba_notifications_total",
                "CIBA ping notifications received, by result: accepted, unknown (no request waits under that auth_req_id: forged, replayed or late), wrong_token, no_token, malformed.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "countersign_config_reload_total",
                "Configuration reloads (SIGHUP or a changed file), by result: ok, error (the running policies stay), restart_required (nothing applied).",
            ),
            &["result"],
        )
        .expect("valid metric");
        // Known results start at 0, so that the first failed reload is an
        // increase and not a new series.
        for result in ["ok", "error", "restart_required"] {
            config_reloads.with_label_values(&[result]);
        }
        let config_last_good_load = IntGauge::new(
            "countersign_config_last_reload_success_timestamp_seconds",
            "Unix time of the last configuration load that took effect (start or reload).",
        )
        .expect("valid metric");
        let store_duration = HistogramVec::new(
            HistogramOpts::new(
                "countersign_store_operation_duration_seconds",
                "Seconds per approval-store operation, by operation.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["op"],
        )
        .expect("valid metric");
        let store_errors = IntCounterVec::new(
            Opts::new(
                "countersign_store_errors_total",
                "Approval-store operations that failed (unreachable or timed out), by operation.",
            ),
            &["op"],
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "countersign_build_info",
                "Always 1; labels carry the build.",
            ),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for collector in [
            Box::new(calls.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(approvals.clone()),
            Box::new(pending_approvals.clone()),
            Box::new(held_calls.clone()),
            Box::new(lease_takeovers.clone()),
            Box::new(heartbeat_lapses.clone()),
            Box::new(outcome_unknown.clone()),
            Box::new(retries_attached.clone()),
            Box::new(shadow_decisions.clone()),
            Box::new(approval_wait.clone()),
            Box::new(ciba_requests.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(ciba_notifications.clone()),
            Box::new(config_reloads.clone()),
            Box::new(config_last_good_load.clone()),
            Box::new(store_duration.clone()),
            Box::new(store_errors.clone()),
            Box::new(build_info),
        ] {
            registry.register(collector).expect("unique metric names");
        }
        Self {
            registry,
            calls,
            approvals,
            pending_approvals,
            held_calls,
            lease_takeovers,
            heartbeat_lapses,
            outcome_unknown,
            retries_attached,
            shadow_decisions,
            approval_wait,
            ciba_requests,
            upstream_duration,
            ciba_notifications,
            config_reloads,
            config_last_good_load,
            store_duration,
            store_errors,
        }
    }

    /// The text exposition of these metrics and of the default registry.
    pub fn render(&self) -> String {
        let mut families = self.registry.gather();
        families.extend(prometheus::gather());
        let mut out = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which
        // the constructors above rule out.
        let _ = TextEncoder::new().encode(&families, &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prefixed_metrics_with_build_info() {
        let metrics = Metrics::new();
        metrics.calls.with_label_values(&["buy", "approved"]).inc();
        metrics
            .approval_wait
            .with_label_values(&["approved"])
            .observe(3.0);
        let text = metrics.render();
        assert!(text.contains("countersign_calls_total{outcome=\"approved\",policy=\"buy\"} 1"));
        assert!(text.contains("countersign_build_info{version="));
        assert!(text.contains("countersign_approval_wait_seconds_bucket"));
    }

    #[test]
    fn counters_alerts_watch_start_at_zero() {
        let text = Metrics::new().render();
        for series in [
            "countersign_heartbeat_lapses_total 0",
            "countersign_outcome_unknown_total 0",
            "countersign_config_reload_total{result=\"error\"} 0",
            "countersign_config_reload_total{result=\"ok\"} 0",
            "countersign_config_reload_total{result=\"restart_required\"} 0",
        ] {
            assert!(text.contains(series), "{series} in {text}");
        }
    }
}
