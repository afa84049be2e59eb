//! A small Socket.IO v5 client over Engine.IO v4 websockets.
//!
//! Written for the load generator, where thousands of sockets per process
//! must stay cheap: one task per socket reads frames, answers pings and
//! routes events and acknowledgements; writes go straight to the socket's
//! sink. The integration tests use it as the Rust-side client.
//!
//! Frames (text): `0{...}` open, `2`/`3` ping/pong, `40/ns,{auth}` connect,
//! `42/ns,<ack>[event, data]` event, `43/ns,<ack>[data]` ack, `41/ns,` disconnect.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Sink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>;
type Acks = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// An event received from the server, with the instant it arrived.
#[derive(Debug, Clone)]
pub struct Event {
    pub name: String,
    pub data: Value,
    pub at: std::time::Instant,
}

/// How to reach the server.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://host:port`.
    pub base: String,
    /// Engine.IO path, e.g. `/socket.io` or `/api/socket.io`.
    pub path: String,
    /// Socket.IO namespace, e.g. `/` or `/api/socket.io`.
    pub namespace: String,
    /// Send the headers a browser sends with its websocket handshake
    /// ([`BROWSER_HEADERS`]), cookies included, instead of the bare minimum.
    pub browser_headers: bool,
}

/// What Chrome sends with the websocket handshake of a web app signed in
/// with Clerk, beyond the handshake's own headers: cookies of the app's
/// domain (Clerk's session JWT among them) and the usual browser headers.
/// A server keeps every header of a connection's first request for the
/// connection's life, so these are what an idle connection costs in
/// production, not the bare handshake a load tool sends.
pub const BROWSER_HEADERS: [(&str, &str); 7] = [
    ("origin", "http://localhost:3000"),
    ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"),
    ("accept-encoding", "gzip, deflate, br, zstd"),
    ("accept-language", "en-US,en;q=0.9,de;q=0.8"),
    ("cache-control", "no-cache"),
    ("pragma", "no-cache"),
    ("sec-websocket-extensions", "permessage-deflate; client_max_window_bits"),
];

/// A cookie header of the size a Clerk app's domain carries (a session JWT
/// of ~1 KB, a dev-browser JWT, a few small cookies): ~1.6 KB.
pub fn browser_cookie() -> String {
    let jwt = |n: usize| {
        "eyJhbGciOiJSUzI1NiJ9"
            .chars()
            .cycle()
            .take(n)
            .collect::<String>()
    };
    format!(
        "__session={}; __client_uat=1732700000; __clerk_db_jwt={}; _ga=GA1.1.1234567890.1732700000; theme=dark",
        jwt(1100),
        jwt(400)
    )
}

impl Target {
    /// The seed's URL read as a path: namespace `/` on `/api/socket.io`.
    pub fn seed_path(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            path: "/api/socket.io".into(),
            namespace: "/".into(),
            browser_headers: false,
        }
    }
    /// The seed's URL read as a namespace: `/api/socket.io` on `/socket.io`.
    pub fn seed_namespace(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            path: "/socket.io".into(),
            namespace: "/api/socket.io".into(),
            browser_headers: false,
        }
    }
}

pub struct Client {
    sink: Arc<tokio::sync::Mutex<Sink>>,
    prefix: String,
    acks: Acks,
    next_ack: AtomicU64,
    events: mpsc::UnboundedReceiver<Event>,
    /// Events taken out of the queue by `wait_for` but not matched, kept in order.
    backlog: std::collections::VecDeque<Event>,
    /// The socket id from the CONNECT answer.
    pub sid: String,
}

impl Client {
    /// Opens the websocket, sends CONNECT with `auth`, and waits for the
    /// server's CONNECT (or CONNECT_ERROR).
    pub async fn connect(target: &Target, auth: Value) -> anyhow::Result<Self> {
        Self::connect_from(target, auth, None).await
    }

    /// Like [`Client::connect`], binding the local end to `local_ip` (spreads
    /// many connections over 127.0.0.x source addresses).
    pub async fn connect_from(
        target: &Target,
        auth: Value,
        local_ip: Option<std::net::IpAddr>,
    ) -> anyhow::Result<Self> {
        let ws_base = target.base.replacen("http", "ws", 1);
        let url = format!(
            "{}{}/?EIO=4&transport=websocket",
            ws_base,
            target.path.trim_end_matches('/')
        );
        let mut request = url
            .as_str()
            .into_client_request()
            .with_context(|| format!("websocket request to {url}"))?;
        if target.browser_headers {
            let headers = request.headers_mut();
            for (name, value) in BROWSER_HEADERS {
                headers.insert(name, HeaderValue::from_static(value));
            }
            headers.insert("cookie", HeaderValue::from_str(&browser_cookie())?);
        }
        let stream = match local_ip {
            None => {
                let (ws, _) = tokio_tungstenite::connect_async_with_config(request, None, true)
                    .await
                    .with_context(|| format!("websocket connect to {url}"))?;
                ws
            }
            Some(ip) => {
                let host = target
                    .base
                    .split("://")
                    .nth(1)
                    .ok_or_else(|| anyhow!("bad base url"))?;
                let addr: std::net::SocketAddr = tokio::net::lookup_host(host)
                    .await?
                    .next()
                    .ok_or_else(|| anyhow!("cannot resolve {host}"))?;
                let socket = if addr.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()?
                } else {
                    tokio::net::TcpSocket::new_v6()?
                };
                socket.bind(std::net::SocketAddr::new(ip, 0))?;
                let tcp = socket.connect(addr).await?;
                tcp.set_nodelay(true)?;
                let (ws, _) =
                    tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(tcp)).await?;
                ws
            }
        };
        let (sink, mut source) = stream.split();
        let sink = Arc::new(tokio::sync::Mutex::new(sink));
        let prefix = if target.namespace == "/" {
            String::new()
        } else {
            format!("{},", target.namespace)
        };

        // Engine.IO open packet.
        match source.next().await {
            Some(Ok(Message::Text(t))) if t.starts_with('0') => {}
            other => bail!("expected the Engine.IO open packet, got {other:?}"),
        }
        sink.lock()
            .await
            .send(Message::text(format!("40{prefix}{auth}")))
            .await?;

        let (events_tx, events) = mpsc::unbounded_channel();
        let acks: Acks = Arc::new(Mutex::new(HashMap::new()));
        let (connected_tx, connected_rx) = oneshot::channel::<Result<String, String>>();
        tokio::spawn(read_loop(
            source,
            sink.clone(),
            prefix.clone(),
            events_tx,
            acks.clone(),
            connected_tx,
        ));
        let sid = match tokio::time::timeout(Duration::from_secs(15), connected_rx).await {
            Ok(Ok(Ok(sid))) => sid,
            Ok(Ok(Err(e))) => bail!("connect refused: {e}"),
            Ok(Err(_)) => bail!("connection closed before CONNECT"),
            Err(_) => bail!("timed out waiting for CONNECT"),
        };
        Ok(Self {
            sink,
            prefix,
            acks,
            next_ack: AtomicU64::new(1),
            events,
            backlog: Default::default(),
            sid,
        })
    }

    /// Emits an event without acknowledgement.
    pub async fn emit(&self, event: &str, data: &Value) -> anyhow::Result<()> {
        let frame = format!("42{}{}", self.prefix, serde_json::json!([event, data]));
        self.sink.lock().await.send(Message::text(frame)).await?;
        Ok(())
    }

    /// Emits an event and returns a receiver of its acknowledgement.
    pub async fn emit_ack(
        &self,
        event: &str,
        data: &Value,
    ) -> anyhow::Result<oneshot::Receiver<Value>> {
        let id = self.next_ack.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.acks
            .lock()
            .map_err(|_| anyhow!("poisoned"))?
            .insert(id, tx);
        let frame = format!(
            "42{}{}{}",
            self.prefix,
            id,
            serde_json::json!([event, data])
        );
        self.sink.lock().await.send(Message::text(frame)).await?;
        Ok(rx)
    }

    /// Emits and waits for the acknowledgement.
    pub async fn call(
        &self,
        event: &str,
        data: &Value,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let rx = self.emit_ack(event, data).await?;
        tokio::time::timeout(timeout, rx)
            .await
            .map_err(|_| anyhow!("no acknowledgement for {event} within {timeout:?}"))?
            .map_err(|_| anyhow!("connection closed"))
    }

    /// The next event, in arrival order.
    pub async fn next(&mut self, timeout: Duration) -> Option<Event> {
        if let Some(e) = self.backlog.pop_front() {
            return Some(e);
        }
        tokio::time::timeout(timeout, self.events.recv())
            .await
            .ok()
            .flatten()
    }

    /// The first event named `name` whose data satisfies `pred`; other events
    /// stay queued, in order, for later calls.
    pub async fn wait_for(
        &mut self,
        name: &str,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        if let Some(i) = self
            .backlog
            .iter()
            .position(|e| e.name == name && pred(&e.data))
        {
            return Ok(self.backlog.remove(i).map(|e| e.data).unwrap_or_default());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(e)) if e.name == name && pred(&e.data) => return Ok(e.data),
                Ok(Some(e)) => self.backlog.push_back(e),
                Ok(None) => bail!("connection closed while waiting for {name}"),
                Err(_) => bail!("no {name} within {timeout:?}"),
            }
        }
    }

    /// Splits the client into a cheap, clonable emitter and its event stream
    /// (the load generator reads events in one task and emits from another).
    pub fn split(self) -> (Emitter, mpsc::UnboundedReceiver<Event>) {
        (
            Emitter {
                sink: self.sink,
                prefix: self.prefix,
            },
            self.events,
        )
    }

    /// Closes the socket.
    pub async fn close(&self) {
        let mut sink = self.sink.lock().await;
        let _ = sink.send(Message::text(format!("41{}", self.prefix))).await;
        let _ = sink.close().await;
    }
}

async fn read_loop(
    mut source: futures::stream::SplitStream<WebSocketStream<MaybeTlsStream<TcpStream>>>,
    sink: Arc<tokio::sync::Mutex<Sink>>,
    prefix: String,
    events: mpsc::UnboundedSender<Event>,
    acks: Acks,
    connected: oneshot::Sender<Result<String, String>>,
) {
    let mut connected = Some(connected);
    while let Some(Ok(msg)) = source.next().await {
        let Message::Text(text) = msg else { continue };
        let text = text.as_str();
        if text == "2" {
            let _ = sink.lock().await.send(Message::text("3")).await;
            continue;
        }
        let Some(packet) = text.strip_prefix('4') else {
            continue;
        };
        let (kind, rest) = packet.split_at(packet.len().min(1));
        let rest = rest.strip_prefix(prefix.as_str()).unwrap_or(rest);
        match kind {
            "0" => {
                let sid = serde_json::from_str::<Value>(rest)
                    .ok()
                    .and_then(|v| v.get("sid").and_then(|s| s.as_str()).map(String::from))
                    .unwrap_or_default();
                if let Some(c) = connected.take() {
                    let _ = c.send(Ok(sid));
                }
            }
            "4" => {
                if let Some(c) = connected.take() {
                    let _ = c.send(Err(rest.to_string()));
                }
            }
            "1" => break,
            "2" => {
                // Optional ack id before the JSON array.
                let start = rest.find('[').unwrap_or(0);
                if let Ok(Value::Array(mut parts)) = serde_json::from_str::<Value>(&rest[start..]) {
                    if parts.is_empty() {
                        continue;
                    }
                    let name = parts.remove(0).as_str().unwrap_or_default().to_string();
                    let data = if parts.is_empty() {
                        Value::Null
                    } else {
                        parts.remove(0)
                    };
                    let _ = events.send(Event {
                        name,
                        data,
                        at: std::time::Instant::now(),
                    });
                }
            }
            "3" => {
                let start = rest.find('[').unwrap_or(rest.len());
                let Ok(id) = rest[..start].parse::<u64>() else {
                    continue;
                };
                let data = serde_json::from_str::<Value>(&rest[start..])
                    .ok()
                    .and_then(|v| v.as_array().and_then(|a| a.first().cloned()))
                    .unwrap_or(Value::Null);
                if let Some(tx) = acks.lock().ok().and_then(|mut a| a.remove(&id)) {
                    let _ = tx.send(data);
                }
            }
            _ => {}
        }
    }
    // Dropping `events` tells waiters the connection is gone.
}

/// The sending half of a [`Client`], for fire-and-forget events.
#[derive(Clone)]
pub struct Emitter {
    sink: Arc<tokio::sync::Mutex<Sink>>,
    prefix: String,
}

impl Emitter {
    pub async fn emit(&self, event: &str, data: &Value) -> anyhow::Result<()> {
        let frame = format!("42{}{}", self.prefix, serde_json::json!([event, data]));
        self.sink.lock().await.send(Message::text(frame)).await?;
        Ok(())
    }

    pub async fn close(&self) {
        let mut sink = self.sink.lock().await;
        let _ = sink.send(Message::text(format!("41{}", self.prefix))).await;
        let _ = sink.close().await;
    }
}
