//! Logging, tracing and metrics set-up shared by both binaries.
//!
//! Logs go to stderr through `tracing` (`RUST_LOG` filters them; `LOG_FORMAT=json`
//! for JSON lines). Spans are OpenTelemetry spans through
//! `tracing-opentelemetry`, so the W3C trace context of a `message:send`
//! travels inside its stream entry and the worker's span continues the
//! gateway's trace. Metrics are recorded with the `metrics` facade and
//! rendered by the Prometheus exporter at `/metrics`.

use std::collections::HashMap;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init_tracing(service: &'static str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let provider = SdkTracerProvider::builder().build();
    let tracer = provider.tracer(service);
    opentelemetry::global::set_tracer_provider(provider);
    let otel = tracing_opentelemetry::layer().with_tracer(tracer);
    let json = std::env::var("LOG_FORMAT")
        .map(|v| v == "json")
        .unwrap_or(false);
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init();
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .init();
    }
}

/// Latency buckets (seconds) of the histograms, from 1 ms to 10 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// Size buckets of the histograms named `*_entries` (e.g. `worker_batch_entries`).
const SIZE_BUCKETS: [f64; 11] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 512.0, 1000.0, 5000.0,
];

fn builder() -> anyhow::Result<PrometheusBuilder> {
    Ok(PrometheusBuilder::new()
        .set_buckets(&LATENCY_BUCKETS)?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_entries".into()),
            &SIZE_BUCKETS,
        )?)
}

/// Installs the Prometheus recorder and returns the handle `/metrics` renders
/// (the gateway serves it on its own port).
pub fn init_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = builder()?.install_recorder()?;
    // Histogram samples pile up until drained: without a scraper, memory
    // would grow with every recorded latency. Drain them periodically.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Installs the Prometheus recorder with its own `/metrics` listener on
/// `port` (the worker, which serves no HTTP otherwise).
pub fn init_metrics_listener(port: u16) -> anyhow::Result<()> {
    builder()?
        .with_http_listener(([0, 0, 0, 0], port))
        .install()?;
    Ok(())
}

/// The W3C trace context of the current span, to carry in a bus entry.
pub fn current_trace_context() -> HashMap<String, String> {
    let mut carrier = HashMap::new();
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier
}

/// Makes `span` a child of the trace context carried by a bus entry.
pub fn continue_trace(span: &tracing::Span, carrier: &HashMap<String, String>) {
    let cx = TraceContextPropagator::new().extract(carrier);
    let _ = span.set_parent(cx);
}
