//! The worker's `METRICS_PORT` listener: `/metrics` (Prometheus text),
//! `/healthz` (the process answers) and `/readyz` (Redis and the database
//! answer and the worker is not shutting down; 503 otherwise).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use switchboard_shared::backends::Backends;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct Probes {
    metrics: PrometheusHandle,
    backends: Backends,
    stopping: CancellationToken,
}

pub fn router(
    metrics: PrometheusHandle,
    backends: Backends,
    stopping: CancellationToken,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(Probes {
            metrics,
            backends,
            stopping,
        })
}

async fn metrics_text(State(p): State<Probes>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        p.metrics.render(),
    )
        .into_response()
}

/// Sets `switchboard_ready` (1 or 0) every 5 s from the same checks as
/// `/readyz`, so an alert sees a worker that answers scrapes but cannot work.
pub fn spawn_readiness_gauge(backends: Backends, stopping: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        while !stopping.is_cancelled() {
            tick.tick().await;
            let ready = backends.bus.ping().await.is_ok() && backends.store.ping().await.is_ok();
            metrics::gauge!("switchboard_ready").set(if ready { 1.0 } else { 0.0 });
        }
        metrics::gauge!("switchboard_ready").set(0.0);
    });
}

async fn readyz(State(p): State<Probes>) -> Response {
    if p.stopping.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopping").into_response();
    }
    let bus = p.backends.bus.ping().await;
    let db = p.backends.store.ping().await;
    match (bus, db) {
        (Ok(()), Ok(())) => "ok".into_response(),
        (bus, db) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "unavailable: redis {}, database {}",
                bus.err().map_or("ok".to_string(), |e| e.to_string()),
                db.err().map_or("ok".to_string(), |e| e.to_string())
            ),
        )
            .into_response(),
    }
}
