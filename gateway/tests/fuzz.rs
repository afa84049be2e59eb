//! Protocol fuzzing against a live gateway (issue 11, item 6).
//!
//! Many concurrent raw clients — WebSocket (`/socket.io/` and
//! `/api/socket.io/`) and HTTP long-polling, some upgrading one to the
//! other — send what no Socket.IO client would: truncated packets, wrong
//! Engine.IO and Socket.IO type digits, bogus namespaces, binary-attachment
//! packets whose announced count is wrong (0, 5, 10^6, 2^64), JSON nested
//! 100,000 levels deep, invalid UTF-8 in binary frames, text frames and
//! polling bodies, 30-digit acknowledgement ids, events before the
//! Socket.IO CONNECT and on namespaces that were never connected, and
//! seeded random bytes and mutations of valid packets. Everything is drawn
//! from a seeded RNG, so every run sends the same packets (only the
//! interleaving with the server's answers varies).
//!
//! What it proves is what a user or an operator would see:
//! - the gateway never dies and never panics (process alive, `/healthz`,
//!   no `panicked` in its stderr or the worker's);
//! - two legitimately connected users keep chatting throughout: every
//!   message sent during and after the fuzzing reaches the other user as
//!   `message:created`, with a latency reported and bounded;
//! - nothing a socket sends before its CONNECT, or on a namespace it did
//!   not connect, is ever processed: no fuzz message reaches the channel;
//! - nothing leaks: once the fuzz sockets are gone, `gateway_sockets_connected`,
//!   `gateway_channel_subscriptions`, the Redis channel topics and the
//!   gateway's open file descriptors are back to their baseline, and its
//!   resident memory is bounded (numbers printed for the record).

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// The seed of every packet sent (task `i` uses `SEED + i`).
const SEED: u64 = 0x5b0a_2d11;
/// Concurrent fuzzing clients.
const TASKS: u64 = 32;
/// Identical fuzzing rounds (same seeds), each followed by the leak checks.
const ROUNDS: u64 = 2;
/// Sessions (of any kind) each fuzzing client opens, one after the other.
const SESSIONS_PER_TASK: u64 = 150;
/// Upper bound of a fuzzing round, whatever the machine's speed.
const FUZZ_CAP: Duration = Duration::from_secs(10);
/// The gateway's database pool size (the default `DB_POOL_SIZE`).
const DB_POOL_SIZE: usize = 10;

/// A fuzzing client's view of the cluster.
#[derive(Clone)]
struct Ctx {
    base: String,
    /// The private channel of the two chatting users (fuzz users are not members).
    chat: String,
    /// A public channel of the fuzz users.
    fuzz_channel: String,
    /// A message of `fuzz_channel` (reactions, reads).
    fuzz_message: String,
    /// Handshake `auth` of fuzz user `i`.
    fuzz_auth: Vec<Value>,
    /// Handshake `auth` of a member of `chat` (for the never-processed checks).
    member_auth: Value,
}

/// What the fuzzing clients saw, for the report.
#[derive(Default)]
struct Tally {
    sessions: AtomicU64,
    packets: AtomicU64,
    closed_by_server: AtomicU64,
    polling_requests: AtomicU64,
    polling_refused: AtomicU64,
    connect_errors: AtomicU64,
}

fn count(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// Open file descriptors of a process (sockets included).
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The gateway's open TCP connections by what is at the other end:
/// `(clients, postgres, redis, other)`, from `/proc/<pid>/fd` and
/// `/proc/<pid>/net/tcp{,6}`.
fn tcp_peers(pid: u32, port: u16) -> (usize, usize, usize, usize) {
    let mut by_inode = std::collections::HashMap::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let port_of = |a: &str| {
                a.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    .unwrap_or(0)
            };
            by_inode.insert(f[9].to_string(), (port_of(f[1]), port_of(f[2])));
        }
    }
    let (mut clients, mut pg, mut redis, mut other) = (0, 0, 0, 0);
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(link) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let link = link.to_string_lossy().to_string();
        let Some(inode) = link
            .strip_prefix("socket:[")
            .and_then(|l| l.strip_suffix(']'))
        else {
            continue;
        };
        match by_inode.get(inode) {
            Some((local, _)) if *local == port => clients += 1,
            Some((_, 5432)) => pg += 1,
            Some((_, 6379)) => redis += 1,
            _ => other += 1,
        }
    }
    (clients, pg, redis, other)
}

/// `true` while the process runs (our child: a dead one stays a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            s.lines()
                .find(|l| l.starts_with("State:"))
                .is_some_and(|l| !l.contains("Z (zombie)") && !l.contains("X (dead)"))
        })
        .unwrap_or(false)
}

/// The whole stderr of a process of the cluster.
fn full_log(c: &Cluster, name: &str) -> String {
    let path = std::env::temp_dir().join(&c.db).join(format!("{name}.log"));
    std::fs::read_to_string(path).unwrap_or_default()
}

fn percentile(sorted: &[u128], p: f64) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

// ---------------------------------------------------------------------------
// Packet generation
// ---------------------------------------------------------------------------

/// A frame to send: text or binary.
enum Frame {
    Text(String),
    Binary(Vec<u8>),
}

/// Well-formed packets of every event the gateway handles, addressed to the
/// fuzz users' own channel and message (mutated before sending) — plus
/// writes to the chat channel, which a fuzz user is not a member of.
fn templates(ctx: &Ctx) -> Vec<String> {
    let (ch, chat, msg) = (&ctx.fuzz_channel, &ctx.chat, &ctx.fuzz_message);
    vec![
        format!(r#"42["message:send",{{"content":"FUZZ hi","channelId":"{ch}","tempId":"t1"}}]"#),
        format!(r#"4217["message:send",{{"content":"FUZZ ack","channelId":"{ch}"}}]"#),
        format!(
            r#"42["message:send",{{"content":"FUZZ chat","channelId":"{chat}","tempId":"x"}}]"#
        ),
        format!(
            r#"42["message:send",{{"content":"FUZZ reply","channelId":"{ch}","replyToId":"{msg}"}}]"#
        ),
        format!(r#"42/api/socket.io,3["channel:join",{{"channelId":"{ch}"}}]"#),
        format!(r#"42["channel:join",{{"channelId":"{chat}"}}]"#),
        format!(r#"425["channel:leave",{{"channelId":"{ch}"}}]"#),
        format!(r#"429["channel:sync",{{"channelId":"{ch}","afterSeq":0}}]"#),
        format!(r#"42["reaction:add",{{"messageId":"{msg}","type":"+1"}}]"#),
        format!(r#"421["reaction:remove",{{"messageId":"{msg}","type":"+1"}}]"#),
        format!(r#"42["message:read",{{"messageId":"{msg}"}}]"#),
        format!(r#"42["typing:start",{{"channelId":"{ch}"}}]"#),
        format!(r#"42["typing:stop",{{"channelId":"{ch}"}}]"#),
        format!(r#"451-["message:send",{{"_placeholder":true,"num":0}}]"#),
        format!(r#"461-7[{{"_placeholder":true,"num":0}}]"#),
        r#"43["ok"]"#.to_string(),
        r#"4312[{"ok":true}]"#.to_string(),
        r#"41"#.to_string(),
        r#"40/api/socket.io,"#.to_string(),
    ]
}

/// Handcrafted malformed packets: what a buggy or hostile client sends.
fn malformed(ctx: &Ctx) -> Vec<Frame> {
    let ch = &ctx.fuzz_channel;
    let digits30 = "123456789012345678901234567890";
    let mut v: Vec<String> = vec![
        // Engine.IO: empty, unknown types, client-sent open, upgrade/noop out of place.
        "".into(),
        "7".into(),
        "8x".into(),
        "9".into(),
        "a".into(),
        " 42[]".into(),
        "\u{feff}42[]".into(),
        "0".into(),
        "0{\"sid\":\"x\"}".into(),
        "2probe".into(),
        "3probe".into(),
        "3".into(),
        "5".into(),
        "6".into(),
        "2".into(),
        // Socket.IO: truncated and wrong type digits.
        "4".into(),
        "4x".into(),
        "47".into(),
        "48[\"a\"]".into(),
        "49".into(),
        "4-1[\"a\"]".into(),
        "42".into(),
        "42[".into(),
        "42[\"".into(),
        "42[\"message:send\"".into(),
        "42[\"message:send\",".into(),
        "42[\"message:send\",{\"content\":".into(),
        "42{}".into(),
        "42[]".into(),
        "42[1]".into(),
        "42[null]".into(),
        "42[[]]".into(),
        "42[{}]".into(),
        "42\"message:send\"".into(),
        "42nonsense".into(),
        "42[\"message:send\"]".into(),
        "42[\"message:send\",null]".into(),
        "42[\"message:send\",[]]".into(),
        "42[\"message:send\",\"x\"]".into(),
        "42[\"message:send\",{}]".into(),
        format!("42[\"message:send\",{{\"content\":5,\"channelId\":\"{ch}\"}}]"),
        format!("42[\"message:send\",{{\"content\":\"FUZZ\\u0000nul\",\"channelId\":\"{ch}\"}}]"),
        format!("42[\"message:send\",{{\"content\":\"FUZZ \\ud800\",\"channelId\":\"{ch}\"}}]"),
        format!("42[\"message:send\",{{\"content\":\"FUZZ\",\"channelId\":\"{ch}\",\"tempId\":{{}}}}]"),
        format!(
            "42[\"message:send\",{{\"content\":\"FUZZ\",\"channelId\":\"{ch}\",\"tempId\":\"{}\"}}]",
            "t".repeat(129)
        ),
        format!(
            "42[\"message:send\",{{\"content\":\"{}\",\"channelId\":\"{ch}\"}}]",
            "F".repeat(4001)
        ),
        format!("42[\"channel:sync\",{{\"channelId\":\"{ch}\",\"afterSeq\":1e400}}]"),
        format!("42[\"channel:sync\",{{\"channelId\":\"{ch}\",\"afterSeq\":-1}}]"),
        format!(
            "42[\"channel:sync\",{{\"channelId\":\"{ch}\",\"afterSeq\":99999999999999999999999}}]"
        ),
        "42[\"channel:join\",{\"channelId\":[1,2]}]".into(),
        "42[\"channel:join\",{\"channelId\":\"../../etc\"}]".into(),
        "42[\"reaction:add\",{\"messageId\":\"nope\",\"type\":\"\"}]".into(),
        "42[\"message:read\",{\"messageId\":{\"$gt\":\"\"}}]".into(),
        "42[\"__proto__\",{}]".into(),
        // Not a client event, with an ack id: dropped unanswered.
        "427[\"message:sent\",{}]".into(),
        "42[\"connection:success\",{}]".into(),
        "42[\"disconnect\"]".into(),
        // Namespaces: bogus, empty, not connected, absurdly long.
        "40/nope,{}".into(),
        "40/,{}".into(),
        "40//,".into(),
        "40/api/socket.io".into(),
        "40/api/socket.io,{".into(),
        "40{\"token\":5}".into(),
        "40[]".into(),
        "40\"auth\"".into(),
        "41/nope,".into(),
        "44{\"message\":\"x\"}".into(),
        "43".into(),
        "431".into(),
        "43/nope,5[]".into(),
        "42/nope,[\"message:send\",{}]".into(),
        "42/api/socket.io,[\"message:send\",{}]".into(),
        format!("4{},[]", "/".repeat(1000)),
        format!("42/{},[\"x\"]", "a".repeat(10_000)),
        // Huge acknowledgement ids.
        format!("42{digits30}[\"message:send\",{{}}]"),
        format!("42{digits30}[\"channel:sync\",{{\"channelId\":\"{ch}\",\"afterSeq\":0}}]"),
        format!("43{digits30}[]"),
        "4218446744073709551616[\"message:send\",{}]".into(),
        "4218446744073709551615[\"message:send\",{}]".into(),
        "429223372036854775808[\"message:send\",{}]".into(),
        "42-5[\"message:send\",{}]".into(),
        format!("42/api/socket.io,{digits30}[\"message:send\",{{}}]"),
        // Binary attachment headers with wrong counts.
        "45-[\"message:send\",{\"_placeholder\":true,\"num\":0}]".into(),
        "450-[\"message:send\",{\"_placeholder\":true,\"num\":0}]".into(),
        "455-[\"message:send\",{\"_placeholder\":true,\"num\":4}]".into(),
        "451-[\"message:send\",{\"_placeholder\":true,\"num\":9}]".into(),
        "451-[\"message:send\",{\"_placeholder\":true,\"num\":-1}]".into(),
        "451-[\"message:send\",{\"_placeholder\":\"yes\"}]".into(),
        "451000000-[\"message:send\",{\"_placeholder\":true,\"num\":0}]".into(),
        "454294967296-[\"x\",{\"_placeholder\":true,\"num\":0}]".into(),
        "4518446744073709551615-[\"x\",{\"_placeholder\":true,\"num\":0}]".into(),
        "4599999999999999999999999-[\"x\"]".into(),
        "451-".into(),
        "451-/nope,[\"x\",{\"_placeholder\":true,\"num\":0}]".into(),
        format!("451-{digits30}[\"x\",{{\"_placeholder\":true,\"num\":0}}]"),
        "46-1[{\"_placeholder\":true,\"num\":0}]".into(),
        "462-[{\"_placeholder\":true,\"num\":0}]".into(),
    ];
    // Deep nesting (the JSON parser's recursion), balanced and not.
    let deep = "[".repeat(100_000);
    v.push(format!("42{deep}"));
    v.push(format!("42[\"message:send\",{deep}"));
    v.push(format!("42[{deep}{}]", "]".repeat(100_000)));
    v.push(format!("40{}", "{\"a\":".repeat(50_000)));
    v.push(format!(
        "42[\"message:send\",{{\"content\":{deep}{},\"channelId\":\"{ch}\"}}]",
        "]".repeat(100_000)
    ));
    v.push(format!("451-{deep}"));
    let mut frames: Vec<Frame> = v.into_iter().map(Frame::Text).collect();
    // Binary frames: invalid UTF-8, empty, an attachment with no header.
    frames.push(Frame::Binary(vec![0xff, 0xfe, 0xfd, 0x80, 0xc0, 0xaf]));
    frames.push(Frame::Binary(Vec::new()));
    frames.push(Frame::Binary(b"4\xff\xfe".to_vec()));
    frames.push(Frame::Binary(b"42[\"message:send\",{}]".to_vec()));
    frames
}

/// One fuzz frame: a handcrafted one, a mutated template, or random bytes.
fn fuzz_frame(rng: &mut StdRng, ctx: &Ctx, templates: &[String], corpus: &[Frame]) -> Frame {
    match rng.random_range(0..10) {
        0..=3 => match &corpus[rng.random_range(0..corpus.len())] {
            Frame::Text(t) => Frame::Text(t.clone()),
            Frame::Binary(b) => Frame::Binary(b.clone()),
        },
        4..=7 => {
            let mut bytes = templates[rng.random_range(0..templates.len())]
                .clone()
                .into_bytes();
            mutate(rng, &mut bytes);
            if rng.random_bool(0.8) {
                Frame::Text(String::from_utf8_lossy(&bytes).into_owned())
            } else {
                Frame::Binary(bytes)
            }
        }
        8 => {
            let len = rng.random_range(0..512);
            let mut bytes = vec![0u8; len];
            rng.fill(&mut bytes[..]);
            Frame::Binary(bytes)
        }
        _ => {
            // Random text behind a plausible type prefix.
            let prefix = ["4", "42", "40", "43", "45", "451-", "2", ""][rng.random_range(0..8)];
            let len = rng.random_range(0..256);
            let body: String = (0..len)
                .map(|_| char::from(rng.random_range(0x20u8..0x7f)))
                .collect();
            let _ = ctx;
            Frame::Text(format!("{prefix}{body}"))
        }
    }
}

/// Mutates a packet in place: truncation, byte flips, digit insertion,
/// deletion, duplication, a different type digit.
fn mutate(rng: &mut StdRng, b: &mut Vec<u8>) {
    for _ in 0..rng.random_range(1..4) {
        if b.is_empty() {
            b.push(rng.random());
            continue;
        }
        let i = rng.random_range(0..b.len());
        match rng.random_range(0..7) {
            0 => b.truncate(i),
            1 => b[i] = rng.random_range(0x20u8..0x7f),
            2 => b[i] = rng.random(),
            3 => {
                let digits = rng.random_range(1..25);
                for _ in 0..digits {
                    b.insert(i, b'0' + rng.random_range(0..10u8));
                }
            }
            4 => {
                let j = rng.random_range(i..=b.len());
                b.drain(i..j);
            }
            5 => {
                let j = rng.random_range(i..=b.len().min(i + 64));
                let piece: Vec<u8> = b[i..j].to_vec();
                b.splice(i..i, piece);
            }
            _ => {
                let k = rng.random_range(0..b.len().min(2));
                b[k] = b'0' + rng.random_range(0..10u8);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn ws_url(ctx: &Ctx, rng: &mut StdRng, sid: Option<&str>) -> String {
    let path = if rng.random_bool(0.5) {
        "/socket.io"
    } else {
        "/api/socket.io"
    };
    let mut url = format!(
        "{}{path}/?EIO=4&transport=websocket",
        ctx.base.replacen("http", "ws", 1)
    );
    if let Some(sid) = sid {
        url.push_str("&sid=");
        url.push_str(sid);
    }
    url
}

/// Opens a raw websocket and reads the Engine.IO open packet.
async fn ws_open(url: &str) -> Option<Ws> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.ok()?;
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) if t.starts_with('0') => Some(ws),
        _ => None,
    }
}

/// Sends a frame; `false` once the server has closed the connection.
async fn ws_send(ws: &mut Ws, frame: Frame, tally: &Tally) -> bool {
    count(&tally.packets, 1);
    let msg = match frame {
        Frame::Text(t) => Message::text(t),
        Frame::Binary(b) => Message::binary(Bytes::from(b)),
    };
    match tokio::time::timeout(Duration::from_secs(5), ws.send(msg)).await {
        Ok(Ok(())) => true,
        _ => {
            count(&tally.closed_by_server, 1);
            false
        }
    }
}

/// Reads what the server sends for `wait` (answering pings); `false` once
/// the server closed. Counts CONNECT_ERRORs.
async fn ws_drain(ws: &mut Ws, wait: Duration, tally: &Tally) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return true,
            Ok(Some(Ok(Message::Text(t)))) => {
                if t.as_str() == "2" {
                    let _ = ws.send(Message::text("3")).await;
                } else if t.starts_with("44") {
                    count(&tally.connect_errors, 1);
                }
            }
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => {
                count(&tally.closed_by_server, 1);
                return false;
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Waits for `connection:success` (or anything ending the handshake).
async fn ws_wait_connected(ws: &mut Ws) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.contains("connection:success") => return true,
            Ok(Some(Ok(Message::Text(t)))) if t.contains("connection:error") => return false,
            Ok(Some(Ok(Message::Text(t)))) if t.as_str() == "2" => {
                let _ = ws.send(Message::text("3")).await;
            }
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => return false,
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// Ends a websocket: a close frame, or just dropping the TCP connection.
async fn ws_end(mut ws: Ws, rng: &mut StdRng) {
    match rng.random_range(0..3) {
        0 => {
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
        }
        1 => {
            let _ = ws.send(Message::text("41")).await;
            let _ = ws.send(Message::text("1")).await;
        }
        _ => {}
    }
    drop(ws);
}

/// A websocket that sends junk, with or without an authenticated CONNECT
/// before (or in the middle of) it.
async fn ws_junk(
    ctx: &Ctx,
    rng: &mut StdRng,
    templates: &[String],
    corpus: &[Frame],
    tally: &Tally,
) {
    let url = ws_url(ctx, rng, None);
    let Some(mut ws) = ws_open(&url).await else {
        return;
    };
    let auth = &ctx.fuzz_auth[rng.random_range(0..ctx.fuzz_auth.len())];
    // 0: never connects; 1: connects first; 2: connects in the middle.
    let mode = rng.random_range(0..3);
    if mode == 1 {
        let ns = if rng.random_bool(0.5) {
            ""
        } else {
            "/api/socket.io,"
        };
        if !ws_send(&mut ws, Frame::Text(format!("40{ns}{auth}")), tally).await {
            return;
        }
        if !ws_wait_connected(&mut ws).await {
            return ws_end(ws, rng).await;
        }
    }
    let n = rng.random_range(1..25);
    for i in 0..n {
        if mode == 2
            && i == n / 2
            && !ws_send(&mut ws, Frame::Text(format!("40{auth}")), tally).await
        {
            return;
        }
        let frame = fuzz_frame(rng, ctx, templates, corpus);
        if !ws_send(&mut ws, frame, tally).await {
            return;
        }
        if rng.random_bool(0.2) && !ws_drain(&mut ws, Duration::from_millis(20), tally).await {
            return;
        }
    }
    if ws_drain(
        &mut ws,
        Duration::from_millis(rng.random_range(0..200)),
        tally,
    )
    .await
    {
        ws_end(ws, rng).await;
    }
}

/// A member of the chat channel whose writes must never be processed:
/// sent before the Socket.IO CONNECT, on a namespace it did not connect,
/// or on a bogus one. The chatters assert no `FUZZ` message ever arrives.
async fn ws_never_processed(ctx: &Ctx, rng: &mut StdRng, tally: &Tally) {
    let url = ws_url(ctx, rng, None);
    let Some(mut ws) = ws_open(&url).await else {
        return;
    };
    let send = |ns: &str, ack: &str, tag: &str| {
        Frame::Text(format!(
            "42{ns}{ack}{}",
            json!(["message:send", {"content": format!("FUZZ {tag}"), "channelId": ctx.chat, "tempId": format!("fz-{tag}")}])
        ))
    };
    let before = [
        send("", "", "before-connect"),
        send("/api/socket.io,", "", "before-connect-ns"),
        send("", "123456789012345678901234567890", "before-connect-ack"),
        Frame::Text(format!(
            "451-{}",
            json!(["message:send", {"_placeholder": true, "num": 0}])
        )),
        Frame::Binary(
            json!({"content": "FUZZ binary", "channelId": ctx.chat})
                .to_string()
                .into_bytes(),
        ),
    ];
    for f in before {
        if !ws_send(&mut ws, f, tally).await {
            return;
        }
    }
    let (ns, other) = if rng.random_bool(0.5) {
        ("", "/api/socket.io,")
    } else {
        ("/api/socket.io,", "")
    };
    if !ws_send(
        &mut ws,
        Frame::Text(format!("40{ns}{}", ctx.member_auth)),
        tally,
    )
    .await
    {
        return;
    }
    if !ws_wait_connected(&mut ws).await {
        return ws_end(ws, rng).await;
    }
    let after = [
        send(other, "", "unconnected-ns"),
        send(other, "77", "unconnected-ns-ack"),
        send("/nope,", "", "bogus-ns"),
        send("/api/socket.io/,", "", "near-ns"),
    ];
    for f in after {
        if !ws_send(&mut ws, f, tally).await {
            return;
        }
    }
    if ws_drain(&mut ws, Duration::from_millis(100), tally).await {
        ws_end(ws, rng).await;
    }
}

/// A text frame whose payload is not UTF-8, written by hand (tungstenite
/// will not send one): the server must close the connection.
async fn ws_invalid_utf8_text(ctx: &Ctx, rng: &mut StdRng, tally: &Tally) {
    let url = ws_url(ctx, rng, None);
    let Some(mut ws) = ws_open(&url).await else {
        return;
    };
    if rng.random_bool(0.5) {
        let auth = &ctx.fuzz_auth[rng.random_range(0..ctx.fuzz_auth.len())];
        let _ = ws.send(Message::text(format!("40{auth}"))).await;
        ws_wait_connected(&mut ws).await;
    }
    let mut payload = b"42[\"message:send\",{\"content\":\"".to_vec();
    payload.extend_from_slice(&[0xff, 0xfe, 0xc3, 0x28, 0xa0, 0xa1, 0xed, 0xa0, 0x80]);
    payload.extend_from_slice(b"\"}]");
    let fin_opcode = if rng.random_bool(0.5) { 0x81u8 } else { 0x01 };
    // FIN + text (or a non-final text fragment), masked, mask key 0.
    let mut frame = vec![fin_opcode, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(&payload);
    count(&tally.packets, 1);
    let tcp = ws.get_mut();
    if tcp.write_all(&frame).await.is_err() {
        count(&tally.closed_by_server, 1);
        return;
    }
    if fin_opcode == 0x01 {
        // A continuation that ends the message.
        let _ = tcp
            .write_all(&[0x80, 0x80 | 2, 0, 0, 0, 0, 0xff, 0xff])
            .await;
    }
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                count(&tally.closed_by_server, 1);
                return;
            }
            Ok(Ok(_)) => continue,
            Err(_) => return,
        }
    }
}

/// The HTTP long-polling transport: an Engine.IO session opened by GET.
struct Poll {
    http: reqwest::Client,
    url: String,
}

impl Poll {
    async fn open(ctx: &Ctx, rng: &mut StdRng, tally: &Tally) -> Option<(Poll, String)> {
        let path = if rng.random_bool(0.5) {
            "/socket.io"
        } else {
            "/api/socket.io"
        };
        let url = format!("{}{path}/?EIO=4&transport=polling", ctx.base);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .ok()?;
        count(&tally.polling_requests, 1);
        let body = http.get(&url).send().await.ok()?.text().await.ok()?;
        let open: Value = serde_json::from_str(body.strip_prefix('0')?).ok()?;
        let sid = open["sid"].as_str()?.to_string();
        Some((
            Poll {
                http,
                url: format!("{url}&sid={sid}"),
            },
            sid,
        ))
    }

    /// POSTs a body; `false` when the server refused it.
    async fn post(&self, body: Vec<u8>, tally: &Tally) -> bool {
        count(&tally.polling_requests, 1);
        count(&tally.packets, 1);
        let ok = match self
            .http
            .post(&self.url)
            .header("content-type", "text/plain;charset=UTF-8")
            .body(body)
            .send()
            .await
        {
            Ok(r) => r.status().is_success(),
            Err(_) => false,
        };
        if !ok {
            count(&tally.polling_refused, 1);
        }
        ok
    }

    /// One GET (a poll), cut short after `wait`; the body, or `None` when refused.
    async fn get(&self, wait: Duration, tally: &Tally) -> Option<String> {
        count(&tally.polling_requests, 1);
        match self.http.get(&self.url).timeout(wait).send().await {
            Ok(r) if r.status().is_success() => {
                let text = r.text().await.ok()?;
                if text.split('\x1e').any(|p| p.starts_with("44")) {
                    count(&tally.connect_errors, 1);
                }
                Some(text)
            }
            Ok(_) => {
                count(&tally.polling_refused, 1);
                None
            }
            // Cut short: nothing to read yet.
            Err(e) if e.is_timeout() => Some(String::new()),
            Err(_) => None,
        }
    }
}

/// A polling body: one or more packets joined by the record separator,
/// sometimes raw random bytes or a `b<base64>` binary packet.
fn polling_body(rng: &mut StdRng, ctx: &Ctx, templates: &[String], corpus: &[Frame]) -> Vec<u8> {
    if rng.random_bool(0.15) {
        let len = rng.random_range(0..1024);
        let mut b = vec![0u8; len];
        rng.fill(&mut b[..]);
        return b;
    }
    let n = rng.random_range(1..5);
    let mut out = Vec::new();
    for i in 0..n {
        if i > 0 {
            out.push(0x1e);
        }
        match fuzz_frame(rng, ctx, templates, corpus) {
            Frame::Text(t) => out.extend_from_slice(t.as_bytes()),
            Frame::Binary(b) => {
                out.push(b'b');
                if rng.random_bool(0.5) {
                    // Not base64 at all.
                    out.extend_from_slice(&b);
                } else {
                    out.extend_from_slice(b"////AAAA=*=");
                }
            }
        }
    }
    out
}

/// A polling session sending junk bodies, with or without a CONNECT, then
/// closed, abandoned, or upgraded to a websocket that sends junk too.
async fn polling_junk(
    ctx: &Ctx,
    rng: &mut StdRng,
    templates: &[String],
    corpus: &[Frame],
    tally: &Tally,
) {
    let Some((poll, sid)) = Poll::open(ctx, rng, tally).await else {
        return;
    };
    if rng.random_bool(0.5) {
        let auth = &ctx.fuzz_auth[rng.random_range(0..ctx.fuzz_auth.len())];
        if !poll.post(format!("40{auth}").into_bytes(), tally).await {
            return;
        }
        let _ = poll.get(Duration::from_millis(500), tally).await;
    }
    let n = rng.random_range(1..8);
    for _ in 0..n {
        let body = polling_body(rng, ctx, templates, corpus);
        if !poll.post(body, tally).await {
            break;
        }
        if rng.random_bool(0.3) && poll.get(Duration::from_millis(50), tally).await.is_none() {
            break;
        }
    }
    match rng.random_range(0..4) {
        0 => {
            let _ = poll.post(b"1".to_vec(), tally).await;
        }
        1 => {
            // Two polls at once (a protocol violation of its own).
            let (a, b) = tokio::join!(
                poll.get(Duration::from_millis(100), tally),
                poll.get(Duration::from_millis(100), tally)
            );
            let _ = (a, b);
            let _ = poll.post(b"1".to_vec(), tally).await;
        }
        2 => {
            // Upgrade with junk instead of (or after) the probe.
            let url = ws_url(ctx, rng, Some(&sid));
            if let Ok(Ok((mut ws, _))) = tokio::time::timeout(
                Duration::from_secs(5),
                tokio_tungstenite::connect_async(&url),
            )
            .await
            {
                if rng.random_bool(0.5) {
                    let _ = ws.send(Message::text("2probe")).await;
                    let _ = tokio::time::timeout(Duration::from_millis(200), ws.next()).await;
                }
                for _ in 0..rng.random_range(1..6) {
                    let frame = fuzz_frame(rng, ctx, templates, corpus);
                    if !ws_send(&mut ws, frame, tally).await {
                        break;
                    }
                }
                let _ = ws_send(&mut ws, Frame::Text("5".into()), tally).await;
                ws_drain(&mut ws, Duration::from_millis(50), tally).await;
                ws_end(ws, rng).await;
            }
            let _ = poll.post(b"1".to_vec(), tally).await;
        }
        // Abandoned: the server's ping timeout ends it.
        _ => {}
    }
}

/// Requests the Engine.IO endpoint should refuse: bogus sids, protocol
/// versions and transports, bodies that are not UTF-8.
async fn polling_bogus(ctx: &Ctx, rng: &mut StdRng, tally: &Tally) {
    let Ok(http) = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
    else {
        return;
    };
    let base = &ctx.base;
    let queries = [
        "EIO=4&transport=polling&sid=AAAAAAAAAAAAAAAA",
        "EIO=4&transport=polling&sid=",
        "EIO=4&transport=polling&sid=%00%ff",
        "EIO=3&transport=polling",
        "EIO=5&transport=polling",
        "EIO=&transport=polling",
        "EIO=4&transport=carrier-pigeon",
        "EIO=4",
        "transport=polling",
        "EIO=4&transport=polling&sid=123456789012345678901234567890",
        "EIO=4&transport=websocket",
    ];
    let q = queries[rng.random_range(0..queries.len())];
    let url = format!("{base}/socket.io/?{q}");
    count(&tally.polling_requests, 1);
    let resp = if rng.random_bool(0.5) {
        http.get(&url).send().await
    } else {
        let mut body = vec![0u8; rng.random_range(0..256)];
        rng.fill(&mut body[..]);
        http.post(&url).body(body).send().await
    };
    if !resp.map(|r| r.status().is_success()).unwrap_or(false) {
        count(&tally.polling_refused, 1);
    }
}

/// One fuzzing client: `SESSIONS_PER_TASK` sessions of random kinds.
async fn fuzz_task(task: u64, ctx: Ctx, tally: Arc<Tally>, stop: Instant) {
    let mut rng = StdRng::seed_from_u64(SEED + task);
    let templates = templates(&ctx);
    let corpus = malformed(&ctx);
    for _ in 0..SESSIONS_PER_TASK {
        if Instant::now() > stop {
            break;
        }
        count(&tally.sessions, 1);
        let kind = rng.random_range(0..20);
        let session = async {
            match kind {
                0..=8 => ws_junk(&ctx, &mut rng, &templates, &corpus, &tally).await,
                9..=10 => ws_never_processed(&ctx, &mut rng, &tally).await,
                11 => ws_invalid_utf8_text(&ctx, &mut rng, &tally).await,
                12..=17 => polling_junk(&ctx, &mut rng, &templates, &corpus, &tally).await,
                _ => polling_bogus(&ctx, &mut rng, &tally).await,
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), session).await;
    }
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

/// Sends one message from `from` and waits for `to` to receive it as
/// `message:created`; the latency in ms, `None` if it never came.
async fn round_trip(
    from: &switchboard_loadtest::client::Client,
    to: &mut switchboard_loadtest::client::Client,
    channel: &str,
    temp: &str,
) -> Option<u128> {
    let t0 = Instant::now();
    from.emit(
        "message:send",
        &json!({"content": format!("chat {temp}"), "channelId": channel, "tempId": temp}),
    )
    .await
    .ok()?;
    to.wait_for(
        "message:created",
        |d| d["tempId"] == temp || d["message"]["content"] == format!("chat {temp}"),
        Duration::from_secs(10),
    )
    .await
    .ok()?;
    Some(t0.elapsed().as_millis())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_traffic_never_hurts_the_node_or_its_users() {
    let started = Instant::now();
    let c = Cluster::start(ClusterOptions {
        gateways: 1,
        workers: 1,
        env: vec![
            // Abandoned Engine.IO sessions end within a few seconds, so the
            // leak check does not wait for the 85 s defaults.
            ("CONNECT_TIMEOUT_MS".into(), "1000".into()),
            ("PING_INTERVAL_MS".into(), "2000".into()),
            ("PING_TIMEOUT_MS".into(), "3000".into()),
        ],
        ..Default::default()
    })
    .await;
    let base = c.urls[0].clone();
    let pid = c.gateways[0].pid();

    // The chat: a private channel of alice and bob.
    let (s, chat) = c
        .api(
            0,
            "alice",
            "POST",
            "/api/channels",
            Some(json!({"name": "chat", "isPrivate": true})),
        )
        .await;
    assert_eq!(s, 201, "{chat}");
    let chat = chat["id"].as_str().expect("id").to_string();
    let (s, b) = c
        .api(
            0,
            "alice",
            "POST",
            &format!("/api/channels/{chat}/members"),
            Some(json!({"userId": "bob"})),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    // The fuzz users' public channel, with one message in it.
    let fuzz_users: Vec<String> = (0..4).map(|i| format!("fuzz{i}")).collect();
    let fuzz_channel = c
        .channel(&fuzz_users[0], &["fuzz1", "fuzz2", "fuzz3"])
        .await;
    let mut f0 = c.connect(0, &fuzz_users[0]).await;
    let sent = send_burst(&mut f0, &fuzz_channel, "seed", 1).await;
    let fuzz_message = sent.values().next().cloned().expect("a fuzz message");
    f0.wait_for("message:created", |_| true, T)
        .await
        .expect("seed message stored");
    f0.close().await;
    drop(f0);

    let alice = c.connect(0, "alice").await;
    // Bob on the other reading of the seed's URL.
    let mut bob = {
        let target = switchboard_loadtest::client::Target::seed_namespace(&base);
        let mut b = switchboard_loadtest::client::Client::connect(
            &target,
            c.minter.auth("bob").expect("auth"),
        )
        .await
        .expect("bob connects");
        b.wait_for("connection:success", |_| true, T)
            .await
            .expect("connection:success");
        b
    };

    // Warm up, then the baseline.
    let mut warm = Vec::new();
    for i in 0..20 {
        warm.push(
            round_trip(&alice, &mut bob, &chat, &format!("warm-{i}"))
                .await
                .expect("warm-up message"),
        );
    }
    warm.sort_unstable();
    let wait_for_fuzz_users_gone = async || {
        let deadline = Instant::now() + Duration::from_secs(15);
        while gauge(&base, "gateway_sockets_connected").await != 2.0 {
            assert!(Instant::now() < deadline, "fuzz user f0 never left");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    wait_for_fuzz_users_gone().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sockets_before = gauge(&base, "gateway_sockets_connected").await;
    let subs_before = gauge(&base, "gateway_channel_subscriptions").await;
    let topics_before = subscribed_channels(&c.prefix);
    let fds_before = open_fds(pid);
    let port: u16 = base
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let peers_before = tcp_peers(pid, port);
    let rss_before = rss_kib(pid);
    assert_eq!(sockets_before, 2.0, "alice and bob");

    // Fuzz: two identical rounds (same seeds). Memory the allocator kept
    // after the first is reused by the second; a leak grows again.
    let ctx = Ctx {
        base: base.clone(),
        chat: chat.clone(),
        fuzz_channel: fuzz_channel.clone(),
        fuzz_message,
        fuzz_auth: fuzz_users
            .iter()
            .map(|u| c.minter.auth(u).expect("auth"))
            .collect(),
        member_auth: c.minter.auth("alice").expect("auth"),
    };
    // The database pool may grow up to its size under the load: not a
    // leak; any other connection left over is.
    let no_leak = |peers: (usize, usize, usize, usize)| {
        peers.0 <= peers_before.0
            && peers.1 <= DB_POOL_SIZE
            && peers.2 == peers_before.2
            && peers.3 <= peers_before.3
    };
    let tally = Arc::new(Tally::default());
    let peak = Arc::new(AtomicU64::new(rss_before));
    let peak_sockets = Arc::new(AtomicU64::new(0));
    let mut during = Vec::new();
    let mut rounds = Vec::new();
    let mut fuzz_secs = 0.0;
    for round in 0..ROUNDS {
        let fuzz_started = Instant::now();
        let stop = fuzz_started + FUZZ_CAP;
        let mut fuzzers = tokio::task::JoinSet::new();
        for task in 0..TASKS {
            fuzzers.spawn(fuzz_task(task, ctx.clone(), tally.clone(), stop));
        }
        let sampler = {
            let (peak, peak_sockets, base) = (peak.clone(), peak_sockets.clone(), base.clone());
            tokio::spawn(async move {
                loop {
                    peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                    let s = gauge(&base, "gateway_sockets_connected").await as u64;
                    peak_sockets.fetch_max(s, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };

        // Chat while the fuzzers run.
        let mut i = 0;
        while !fuzzers.is_empty() {
            let temp = format!("during-{round}-{i}");
            i += 1;
            let ms = round_trip(&alice, &mut bob, &chat, &temp).await;
            assert!(
                ms.is_some(),
                "{temp} did not reach bob during the fuzzing\n{}",
                c.logs()
            );
            during.extend(ms);
            tokio::time::sleep(Duration::from_millis(50)).await;
            while let Some(r) = fuzzers.try_join_next() {
                r.expect("fuzz task");
            }
        }
        let secs = fuzz_started.elapsed().as_secs_f64();
        fuzz_secs += secs;
        sampler.abort();
        assert!(alive(pid), "the gateway died\n{}", c.logs());

        // The fuzz sockets are gone: everything is back to the baseline.
        let deadline = Instant::now() + Duration::from_secs(20);
        let settle = Instant::now();
        let mut r;
        loop {
            r = Round {
                sockets: gauge(&base, "gateway_sockets_connected").await,
                subscriptions: gauge(&base, "gateway_channel_subscriptions").await,
                topics: subscribed_channels(&c.prefix),
                peers: tcp_peers(pid, port),
                fds: open_fds(pid),
                rss: 0,
                fuzz_secs: secs,
                settle_secs: 0.0,
            };
            let back = (r.sockets, r.subscriptions, r.topics)
                == (sockets_before, subs_before, topics_before)
                && no_leak(r.peers);
            if back || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        r.settle_secs = settle.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_millis(300)).await;
        r.rss = rss_kib(pid);
        rounds.push(r);
    }

    // Chat after the fuzzing.
    let mut after = Vec::new();
    for i in 0..20 {
        let temp = format!("after-{i}");
        let ms = round_trip(&alice, &mut bob, &chat, &temp).await;
        assert!(ms.is_some(), "{temp} did not reach bob after the fuzzing");
        after.extend(ms);
    }
    during.sort_unstable();
    after.sort_unstable();

    // A fuzz user still connects and the node answers.
    let again = c.connect(0, "fuzz3").await;
    again.close().await;
    let health = reqwest::get(format!("{base}/healthz"))
        .await
        .expect("gateway answers /healthz");
    assert!(health.status().is_success());

    // Nothing the fuzzers sent reached the chat.
    let mut leaked = Vec::new();
    while let Some(e) = bob.next(Duration::from_millis(100)).await {
        if e.name == "message:created" {
            leaked.push(e.data);
        }
    }
    let history = c.history("alice", &chat).await;
    let fuzz_in_history: Vec<&Value> = history
        .iter()
        .filter(|m| !m["content"].as_str().unwrap_or("").starts_with("chat "))
        .collect();

    let t = &tally;
    let peak = peak.load(Ordering::Relaxed);
    println!(
        "fuzz: seed {SEED:#x}, {ROUNDS} rounds of {TASKS} concurrent clients, {} sessions, \
         {} packets/bodies, {} polling requests ({} refused), {} connections closed by the \
         server, {} connect errors, in {fuzz_secs:.1} s (peak {} sockets connected)",
        t.sessions.load(Ordering::Relaxed),
        t.packets.load(Ordering::Relaxed),
        t.polling_requests.load(Ordering::Relaxed),
        t.polling_refused.load(Ordering::Relaxed),
        t.closed_by_server.load(Ordering::Relaxed),
        t.connect_errors.load(Ordering::Relaxed),
        peak_sockets.load(Ordering::Relaxed),
    );
    println!(
        "fuzz: chat latency ms (send -> message:created at the other user): warm-up p50 {} \
         p99 {} max {}; during the fuzzing ({} msgs) p50 {} p99 {} max {}; after p50 {} p99 {} \
         max {}",
        percentile(&warm, 0.5),
        percentile(&warm, 0.99),
        warm.last().copied().unwrap_or(0),
        during.len(),
        percentile(&during, 0.5),
        percentile(&during, 0.99),
        during.last().copied().unwrap_or(0),
        percentile(&after, 0.5),
        percentile(&after, 0.99),
        after.last().copied().unwrap_or(0),
    );
    println!(
        "fuzz: baseline: gateway_sockets_connected {sockets_before}, \
         gateway_channel_subscriptions {subs_before}, redis channel topics {topics_before}, \
         open fds {fds_before}, TCP (clients, postgres, redis, other) {peers_before:?}, \
         RSS {rss_before} KiB"
    );
    for (i, r) in rounds.iter().enumerate() {
        println!(
            "fuzz: after round {} ({:.1} s of fuzzing, settled in {:.1} s): \
             gateway_sockets_connected {}, gateway_channel_subscriptions {}, redis channel \
             topics {}, open fds {}, TCP {:?}, RSS {} KiB ({:+} KiB)",
            i + 1,
            r.fuzz_secs,
            r.settle_secs,
            r.sockets,
            r.subscriptions,
            r.topics,
            r.fds,
            r.peers,
            r.rss,
            r.rss as i64 - rss_before as i64
        );
    }
    println!(
        "fuzz: RSS peak {peak} KiB; test {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // The node never died nor panicked.
    assert!(alive(pid), "the gateway died\n{}", c.logs());
    for p in c.gateways.iter().chain(c.workers.iter()) {
        let log = full_log(&c, &p.name);
        assert!(
            !log.contains("panicked"),
            "{} panicked:\n{}",
            p.name,
            log.lines()
                .filter(|l| l.contains("panicked"))
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert!(
        t.sessions.load(Ordering::Relaxed) >= ROUNDS * TASKS * SESSIONS_PER_TASK / 2,
        "the fuzzers did not run"
    );
    // The chatters were never hurt.
    assert!(during.len() >= 10, "too few messages during the fuzzing");
    assert!(
        percentile(&during, 0.99) < 2000,
        "chat p99 {} ms during the fuzzing",
        percentile(&during, 0.99)
    );
    assert!(
        percentile(&after, 0.99) < 500,
        "chat p99 {} ms after the fuzzing",
        percentile(&after, 0.99)
    );
    assert!(
        leaked.is_empty(),
        "unexpected message:created at bob: {leaked:?}"
    );
    assert!(
        fuzz_in_history.is_empty(),
        "fuzz writes stored in the chat: {fuzz_in_history:?}"
    );
    assert_eq!(
        history.len(),
        20 + during.len() + 20,
        "every chat message stored once"
    );
    // Nothing leaked, after either round.
    for (i, r) in rounds.iter().enumerate() {
        let round = i + 1;
        assert_eq!(
            r.sockets, sockets_before,
            "round {round}: gateway_sockets_connected"
        );
        assert_eq!(
            r.subscriptions, subs_before,
            "round {round}: gateway_channel_subscriptions"
        );
        assert_eq!(
            r.topics, topics_before,
            "round {round}: redis channel topics"
        );
        assert!(
            no_leak(r.peers),
            "round {round}: gateway TCP connections (clients, postgres, redis, other) \
             {peers_before:?} -> {:?}",
            r.peers
        );
        assert!(
            r.fds <= fds_before + DB_POOL_SIZE,
            "round {round}: open fds {fds_before} -> {}",
            r.fds
        );
    }
    // Memory: bounded after the first round, and the identical second
    // round adds little on top of it.
    let (first, last) = (rounds[0].rss, rounds[rounds.len() - 1].rss);
    assert!(
        first < rss_before + 64 * 1024,
        "RSS {rss_before} KiB -> {first} KiB after round 1"
    );
    assert!(
        last < first + 16 * 1024,
        "RSS grew again in the identical round: {first} KiB -> {last} KiB"
    );
}

/// The state of the gateway after a fuzzing round, once it settled.
struct Round {
    sockets: f64,
    subscriptions: f64,
    topics: usize,
    /// Open TCP connections: (clients, postgres, redis, other).
    peers: (usize, usize, usize, usize),
    fds: usize,
    rss: u64,
    fuzz_secs: f64,
    settle_secs: f64,
}
