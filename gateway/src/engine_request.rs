//! What an Engine.IO request goes through before the Socket.IO layer.
//!
//! - The seed's URL read as an Engine.IO path (`/api/socket.io/`) is served
//!   by the same Socket.IO server as the default path (`/socket.io/`), so
//!   both readings share sockets, rooms and fan-out: the path is rewritten.
//! - The URI and headers are copied out of the connection's read buffer.
//!   Engine.IO keeps every session's first request for the session's whole
//!   life (`Socket::req_parts`), and hyper parses a request's URI and header
//!   values as slices of that buffer (16 KB): kept, those slices kept the
//!   whole buffer alive, 16 KB on every idle connection for a few hundred
//!   bytes of headers. Owned copies let hyper's buffer go after the upgrade.
//! - The headers nothing here reads after the handshake are dropped
//!   ([`UNREAD_HEADERS`]): a browser sends its cookies (a Clerk app's domain
//!   carries a session JWT of ~1 KB) and a user agent with every handshake,
//!   and kept, they cost every connection that much for its whole life.

use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, Uri};

/// The Engine.IO paths: the default and the seed's reading of its URL.
const ENGINE_PATHS: [&str; 2] = ["/socket.io", "/api/socket.io"];

/// Headers of a browser's Engine.IO request that no layer reads: the
/// gateway authenticates with `auth.token` (never a cookie) and reads only
/// the forwarding headers of a trusted proxy (`client_addr.rs`); Engine.IO
/// and the websocket upgrade read `connection`, `upgrade`, `sec-websocket-*`,
/// `host` and `origin`.
const UNREAD_HEADERS: [&str; 6] = [
    "cookie",
    "user-agent",
    "accept-language",
    "accept-encoding",
    "cache-control",
    "pragma",
];

/// Rewrites the seed's path and detaches an Engine.IO request from the
/// connection's read buffer; any other request passes untouched.
pub fn prepare<B>(mut req: Request<B>) -> Request<B> {
    let path = req.uri().path();
    let Some(rest) = ENGINE_PATHS.iter().find_map(|p| {
        path.strip_prefix(p)
            .filter(|rest| rest.is_empty() || rest.starts_with('/'))
    }) else {
        return req;
    };
    let mut uri = format!("/socket.io{}", if rest.is_empty() { "/" } else { rest });
    if let Some(q) = req.uri().query() {
        uri.push('?');
        uri.push_str(q);
    }
    // Parsed from a fresh String, the new URI owns its bytes.
    if let Ok(uri) = uri.parse::<Uri>() {
        *req.uri_mut() = uri;
    }
    let headers = std::mem::take(req.headers_mut());
    *req.headers_mut() = owned_headers(&headers);
    req
}

/// A copy of `headers` but [`UNREAD_HEADERS`], whose names and values own
/// their bytes (`from_bytes` copies; a standard name is a constant).
fn owned_headers(headers: &HeaderMap) -> HeaderMap {
    let mut owned = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if UNREAD_HEADERS.contains(&name.as_str()) {
            continue;
        }
        let (Ok(name), Ok(mut copy)) = (
            HeaderName::from_bytes(name.as_str().as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) else {
            continue;
        };
        copy.set_sensitive(value.is_sensitive());
        owned.append(name, copy);
    }
    owned
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str) -> Request<()> {
        Request::builder()
            .uri(uri)
            .header("cookie", "a=1")
            .header("x-forwarded-for", "10.0.0.1")
            .header("x-forwarded-for", "10.0.0.2")
            .body(())
            .unwrap()
    }

    #[test]
    fn the_seed_path_is_the_default_path() {
        for (from, to) in [
            (
                "/api/socket.io/?EIO=4&transport=websocket",
                "/socket.io/?EIO=4&transport=websocket",
            ),
            ("/api/socket.io", "/socket.io/"),
            ("/socket.io/?EIO=4", "/socket.io/?EIO=4"),
        ] {
            assert_eq!(prepare(req(from)).uri(), to);
        }
    }

    #[test]
    fn other_paths_pass_untouched() {
        for uri in ["/api/socket.iox/", "/api/channels", "/"] {
            assert_eq!(prepare(req(uri)).uri(), uri);
        }
    }

    #[test]
    fn headers_are_kept_in_order_with_repeats() {
        let r = prepare(req("/socket.io/?EIO=4"));
        let xff: Vec<_> = r.headers().get_all("x-forwarded-for").iter().collect();
        assert_eq!(xff, ["10.0.0.1", "10.0.0.2"]);
    }

    #[test]
    fn unread_headers_are_dropped_from_engine_requests_only() {
        assert!(prepare(req("/socket.io/?EIO=4"))
            .headers()
            .get("cookie")
            .is_none());
        assert_eq!(prepare(req("/api/channels")).headers()["cookie"], "a=1");
    }
}
