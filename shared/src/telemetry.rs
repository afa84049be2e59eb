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
use tracing_subscriber::Layer as _;

/// The provider whose batch exporter [`shutdown_tracing`] flushes.
static PROVIDER: std::sync::OnceLock<SdkTracerProvider> = std::sync::OnceLock::new();

/// Spans exported over OTLP: ours down to `debug` (append, dedupe, insert,
/// publish, emit), others from `info`. `OTEL_TRACES_FILTER` (an `EnvFilter`)
/// replaces it.
const OTEL_DEFAULT_FILTER: &str =
    "info,switchboard_gateway=debug,switchboard_worker=debug,switchboard_shared=debug";

/// True when the standard variables ask for an OTLP trace exporter.
fn otlp_enabled() -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    let exporter_none = std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v == "none");
    !disabled
        && !exporter_none
        && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The tracer provider: with an OTLP/HTTP batch exporter when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set (protocol,
/// headers, timeout and batching from the standard `OTEL_*` variables),
/// without any exporter otherwise (spans are then only the carriers of the
/// W3C context: no export, no cost).
fn tracer_provider(service: &'static str) -> (SdkTracerProvider, bool) {
    if !otlp_enabled() {
        return (SdkTracerProvider::builder().build(), false);
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("OTLP exporter not started ({e}); traces are not exported");
            return (SdkTracerProvider::builder().build(), false);
        }
    };
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service);
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    (provider, true)
}

/// Installs the global subscriber. Call once, first thing in `main`; call
/// [`shutdown_tracing`] before exiting.
pub fn init_tracing(service: &'static str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (provider, exporting) = tracer_provider(service);
    let tracer = provider.tracer(service);
    opentelemetry::global::set_tracer_provider(provider.clone());
    let _ = PROVIDER.set(provider);
    // Without an exporter there is no OpenTelemetry layer at all (no cost;
    // the spans of the message path are `debug`, below the usual log level).
    // Exported spans have their own level filter, independent of the logs'.
    let otel = exporting.then(|| {
        let otel_filter = std::env::var("OTEL_TRACES_FILTER")
            .ok()
            .and_then(|f| EnvFilter::try_new(f).ok())
            .unwrap_or_else(|| EnvFilter::new(OTEL_DEFAULT_FILTER));
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(otel_filter)
    });
    let json = std::env::var("LOG_FORMAT")
        .map(|v| v == "json")
        .unwrap_or(false);
    let registry = tracing_subscriber::registry().with(otel);
    if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .init();
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .init();
    }
    if exporting {
        tracing::info!("exporting traces over OTLP");
    }
}

/// Flushes and stops the trace exporter (a no-op without one).
pub fn shutdown_tracing() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.shutdown();
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
