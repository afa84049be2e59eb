//! Assembles a gateway node: backends, Socket.IO, REST, fan-out, the
//! embedded worker, and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, Method};
use socketioxide::SocketIo;
use switchboard_shared::backends::Backends;
use switchboard_shared::config::Settings;
use switchboard_shared::protocol::events;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::auth::Verifier;
use crate::state::{App, AppState, NAMESPACES};
use crate::{fanout, rest, socket};

fn cors(settings: &Settings) -> Option<CorsLayer> {
    let origins: Vec<HeaderValue> = settings
        .cors_origin_list()
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    if origins.is_empty() {
        return None;
    }
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
            .allow_headers([
                axum::http::header::AUTHORIZATION,
                axum::http::header::CONTENT_TYPE,
            ])
            // The channel list's next-page cursor (rest.rs).
            .expose_headers([
                axum::http::header::LINK,
                axum::http::HeaderName::from_static(crate::rest::NEXT_CURSOR_HEADER),
            ])
            .allow_credentials(true),
    )
}

/// `MAX_PAYLOAD_BYTES` as a WebSocket frame/message limit.
fn ws_limit(max_payload_bytes: u64) -> usize {
    usize::try_from(max_payload_bytes).unwrap_or(usize::MAX)
}

pub async fn serve(mut settings: Settings) -> anyhow::Result<()> {
    let metrics = switchboard_shared::telemetry::init_metrics()?;
    // Exported from the start: dashboards and alerts see 0, not "no data".
    metrics::counter!("gateway_messages_failed_total").increment(0);
    metrics::counter!("gateway_outcomes_timed_out_total").increment(0);
    for result in ["accepted", "refused"] {
        metrics::counter!("gateway_handshakes_total", "result" => result).increment(0);
    }
    for reason in ["missing", "expired", "bad_signature", "invalid"] {
        metrics::counter!("gateway_auth_failures_total", "reason" => reason).increment(0);
    }
    let backends = Backends::connect(&settings).await?;
    if backends.embedded {
        crate::embedded::prepare(&mut settings)?;
    }
    let node_id = settings
        .node_id
        .clone()
        .unwrap_or_else(|| format!("gw-{}", uuid::Uuid::now_v7().simple()));
    let verifier = Verifier::from_settings(&settings)?;
    verifier.warm_up().await;

    let (layer, io) = SocketIo::builder()
        .ping_interval(settings.ping_interval())
        .ping_timeout(settings.ping_timeout())
        .connect_timeout(settings.connect_timeout())
        .max_payload(settings.max_payload_bytes)
        // tungstenite's defaults (16 MiB frames, 64 MiB messages) would let
        // any client make the node buffer that much per frame; with these,
        // a larger frame is refused from its header and closes that one
        // connection (CONTRACT §1), as a larger polling body already does.
        .ws_max_frame_size(ws_limit(settings.max_payload_bytes))
        .ws_max_message_size(ws_limit(settings.max_payload_bytes))
        .max_buffer_size(1024)
        .ws_read_buffer_size(settings.ws_read_buffer_bytes)
        .build_layer();
    let app: App = Arc::new(AppState::new(
        settings.clone(),
        node_id.clone(),
        backends.bus.clone(),
        backends.presence.clone(),
        backends.store.clone(),
        verifier,
        io.clone(),
    ));
    socket::register(&app);
    let dispatcher = fanout::start(app.clone()).await?;

    let worker_cancel = CancellationToken::new();
    let worker = backends.embedded.then(|| {
        let w = switchboard_worker::Worker::new(&backends, &settings);
        tokio::spawn(w.run(worker_cancel.clone()))
    });

    // This node's sockets keep counting (caps, presence) while it lives;
    // users whose last socket is gone are announced offline; typing
    // indicators held back by the throttle or timed out are sent.
    crate::presence::spawn_heartbeat(&app);
    crate::presence::spawn_sweeper(&app);
    app.typing.spawn_ticker();

    // Every accepted write gets its answer within OUTCOME_TIMEOUT_MS.
    let supervisor_app = app.clone();
    tokio::spawn(async move {
        let app = supervisor_app;
        crate::pending::supervise(&app.pending, &app.store, app.settings.outcome_timeout()).await;
    });

    // `switchboard_ready` (1 or 0) every 5 s from the checks of /readyz, for alerting.
    let ready_app = app.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            let app = &ready_app;
            let ready = !app.is_draining()
                && app.bus.ping().await.is_ok()
                && app.store.ping().await.is_ok();
            metrics::gauge!("switchboard_ready").set(if ready { 1.0 } else { 0.0 });
        }
    });

    let mut router =
        rest::router(app.clone(), metrics).layer(DefaultBodyLimit::max(settings.rest_body_limit));
    if settings.auth_dev_secret.is_some() {
        router = router.merge(crate::demo::router(app.clone()));
    }
    let mut router = router.layer(layer).layer(tower::util::MapRequestLayer::new(
        crate::engine_request::prepare,
    ));
    if let Some(cors) = cors(&settings) {
        router = router.layer(cors);
    }

    let addr: SocketAddr = format!("{}:{}", settings.host, settings.port).parse()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    // Small frames (SENT, DELIVERED, room events) must leave at once: without
    // TCP_NODELAY, Nagle's algorithm holds each one behind the previous
    // frame's delayed ACK (~40 ms).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    });
    tracing::info!(node = %node_id, %local, embedded = backends.embedded, "gateway listening");
    if backends.embedded {
        crate::embedded::print_banner(&settings, local);
    }

    let shutdown_app = app.clone();
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        switchboard_shared::shutdown::signal().await;
        drain(&shutdown_app).await;
    })
    .await?;

    worker_cancel.cancel();
    if let Some(w) = worker {
        let _ = w.await;
    }
    dispatcher.abort();
    tracing::info!("gateway stopped");
    Ok(())
}

/// SIGTERM: refuse new work, tell sockets to reconnect elsewhere, wait for
/// accepted writes to be answered (bounded by `DRAIN_TIMEOUT_MS`).
async fn drain(app: &App) {
    tracing::info!("draining: refusing new connections and writes");
    app.start_draining();
    for ns in NAMESPACES {
        if let Some(op) = app.io.of(ns) {
            let _ = op
                .emit(
                    events::SERVER_SHUTDOWN,
                    &serde_json::json!({"reconnect": true}),
                )
                .await;
        }
    }
    let deadline = Instant::now() + Duration::from_millis(app.settings.drain_timeout_ms);
    while !app.pending.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !app.pending.is_empty() {
        tracing::warn!(
            pending = app.pending.len(),
            "drain timeout: some writes are still unanswered (they are queued and will be persisted)"
        );
    }
    // Close the transports rather than disconnect the namespaces: a stock
    // socket.io-client reconnects by itself after a transport close (to
    // another node, behind the load balancer), but not after a server-side
    // namespace disconnect.
    app.io.close().await;
}
