//! The Prometheus endpoint of an IOM or a client (`GET /metrics`, plain
//! HTTP on the address the operator chose; off unless configured).
//!
//! Metrics are recorded with the `metrics` crate's macros where they
//! happen; without an endpoint no recorder is installed and the macros do
//! nothing. The names are documented in docs/operations.md ("Metrics") and
//! the Grafana dashboard in docs/grafana-iomfs.json uses only those (a test
//! checks it against a live scrape).

use std::net::SocketAddr;

/// Buckets of every latency histogram, seconds: 50 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Parses an endpoint address given in `cluster.toml` or a mount option.
pub fn parse_addr(what: &str, s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>().map_err(|e| {
        format!("{what} '{s}' is not an IP address and port ({e}); write it as 127.0.0.1:9400 or [::1]:9400")
    })
}

/// Starts the endpoint on `addr` (within the current tokio runtime) with
/// `labels` added to every series. A second call in one process fails.
pub fn serve(addr: SocketAddr, labels: &[(&str, String)]) -> Result<(), String> {
    let mut b = metrics_exporter_prometheus::PrometheusBuilder::new().with_http_listener(addr);
    for (k, v) in labels {
        b = b.add_global_label(*k, v.clone());
    }
    b = b.set_buckets(LATENCY_BUCKETS).map_err(|e| format!("metrics buckets: {e}"))?;
    // Bind first, so that an address in use is reported here rather than
    // by a task that would only log it.
    std::net::TcpListener::bind(addr).map_err(|e| format!("metrics endpoint {addr}: {e}"))?;
    b.install().map_err(|e| format!("metrics endpoint {addr}: {e}"))
}
