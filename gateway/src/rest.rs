//! The REST API (CONTRACT §6) and the operations endpoints (§8).

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::json;
use switchboard_shared::store::AddMember;
use uuid::Uuid;

use crate::auth::Identity;
use crate::socket::membership;
use crate::socket::messages::storable;
use crate::state::App;

/// A JSON error `{error}` with its status (and `Retry-After`, in seconds,
/// for a 429).
pub struct ApiError(StatusCode, String, Option<u64>);

impl ApiError {
    fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        Self(status, msg.into(), None)
    }
    fn internal(e: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %e, "REST request failed on a backend");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Service temporarily unavailable",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self.2 {
            None => (self.0, Json(json!({"error": self.1}))).into_response(),
            Some(ms) => (
                self.0,
                [(header::RETRY_AFTER, ms.div_ceil(1000).max(1).to_string())],
                Json(json!({"error": self.1, "retryAfterMs": ms})),
            )
                .into_response(),
        }
    }
}

/// Takes a token of the caller's REST-writes bucket (CONTRACT §10): 429
/// with `Retry-After` when it is empty. A bucket that cannot be read lets
/// the request through (the write then meets the backend on its own).
async fn rest_rate(app: &App, caller: &Identity) -> Result<(), ApiError> {
    let Some(limit) = app.settings.rate_limit(
        switchboard_shared::config::RateArea::Rest,
        &app.topics,
        &caller.id,
    ) else {
        return Ok(());
    };
    match app.bus.take_token(&limit).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(ms)) => {
            metrics::counter!("gateway_rate_limited_total", "area" => "rest").increment(1);
            Err(ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                crate::socket::messages::RATE_LIMITED.to_string(),
                Some(ms),
            ))
        }
        Err(e) => {
            tracing::warn!(error = %e, "rate limit unavailable; request let through");
            Ok(())
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::BAD_REQUEST,
        };
        Self::new(status, r.body_text())
    }
}

/// The authenticated caller of a REST request (`Authorization: Bearer`).
pub struct Caller(pub Identity);

impl FromRequestParts<App> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Self::Rejection> {
        let unauthorized = || ApiError::new(StatusCode::UNAUTHORIZED, "User not authenticated");
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(unauthorized)?;
        let id = app.verifier.verify(token, None).await.map_err(|e| {
            metrics::counter!("gateway_auth_failures_total", "reason" => e.label()).increment(1);
            unauthorized()
        })?;
        app.users
            .ensure(&app.store, &id)
            .await
            .map_err(ApiError::internal)?;
        Ok(Caller(id))
    }
}

pub fn router(app: App, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/api/channels", post(create_channel).get(list_channels))
        .route("/api/channels/{id}/members", post(add_member))
        .route(
            "/api/channels/{id}/members/{user_id}",
            delete(remove_member),
        )
        .route("/api/channels/{id}/messages", get(history))
        .route("/api/channels/{id}/presence", get(presence))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        m.render(),
                    )
                }
            }),
        )
        .layer(axum::middleware::from_fn_with_state(
            app.settings.rest_body_limit,
            refuse_oversized,
        ))
        .with_state(app)
}

/// Answers 413 `{error}` to a request whose `Content-Length` is above
/// `REST_BODY_LIMIT`, before anything reads the body (CONTRACT §6). hyper
/// sends `100 Continue` only when the body is first read, so a client that
/// sent `Expect: 100-continue` gets the 413 instead of a `100 Continue`
/// followed by a reset in the middle of its upload; and the node never
/// reads a byte of a body it would refuse. Bodies without a length (chunked)
/// are still bounded while read by `DefaultBodyLimit`.
async fn refuse_oversized(
    State(limit): State<usize>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(len) = announced {
        if len > limit as u64 {
            metrics::counter!("gateway_rest_too_large_total").increment(1);
            let mut resp = ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("Request body too large (limit {limit} bytes)"),
            )
            .into_response();
            // The unread body makes the connection unusable for another request.
            resp.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            return resp;
        }
    }
    next.run(req).await
}

/// Ready when Redis and the database answer and the node is not draining.
/// The answer names the node (`NODE_ID`): behind a load balancer, and for a
/// test harness making sure the port it chose is its own gateway's.
async fn readyz(State(app): State<App>) -> Response {
    let node = &app.node_id;
    if app.is_draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining", "node": node})),
        )
            .into_response();
    }
    let bus = app.bus.ping().await;
    let db = app.store.ping().await;
    match (bus, db) {
        (Ok(()), Ok(())) => Json(json!({"status": "ok", "node": node})).into_response(),
        (bus, db) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "unavailable",
                "node": node,
                "bus": bus.err().map(|e| e.to_string()),
                "database": db.err().map(|e| e.to_string()),
            })),
        )
            .into_response(),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewChannel {
    name: serde_json::Value,
    #[serde(default)]
    is_private: Option<bool>,
}

/// Longest channel name, in characters.
const MAX_CHANNEL_NAME: usize = 80;

async fn create_channel(
    State(app): State<App>,
    Caller(caller): Caller,
    body: Result<Json<NewChannel>, JsonRejection>,
) -> Result<Response, ApiError> {
    rest_rate(&app, &caller).await?;
    let Json(body) = body?;
    let name = body
        .name
        .as_str()
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "name must be a non-empty string"))?;
    if name.chars().count() > MAX_CHANNEL_NAME {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("name is too long (at most {MAX_CHANNEL_NAME} characters)"),
        ));
    }
    storable("name", name).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let view = app
        .store
        .create_channel(name, body.is_private.unwrap_or(false), &caller.id)
        .await
        .map_err(ApiError::internal)?;
    if let Ok(id) = Uuid::parse_str(&view.id) {
        membership::announce(&app, &caller.id, id).await;
    }
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

#[derive(Deserialize)]
struct ChannelListQuery {
    after: Option<String>,
    limit: Option<String>,
}

/// Channel list page size without `limit`.
const DEFAULT_CHANNEL_LIMIT: u64 = 100;
/// Largest channel list page.
const MAX_CHANNEL_LIMIT: u64 = 500;
/// Header carrying the cursor of the next channel list page.
pub const NEXT_CURSOR_HEADER: &str = "x-next-cursor";

/// `GET /api/channels?limit=<1..500, default 100>&after=<channelId>`: the
/// caller's channels and the public ones, in id (creation) order. The body
/// stays the bare JSON array it always was, so existing clients keep
/// working; when there are more, the cursor of the next page (the last id of
/// this one) is in `X-Next-Cursor` and a `Link: <…>; rel="next"` header.
async fn list_channels(
    State(app): State<App>,
    Caller(caller): Caller,
    Query(q): Query<ChannelListQuery>,
) -> Result<Response, ApiError> {
    let limit = query_limit(q.limit.as_deref(), DEFAULT_CHANNEL_LIMIT, MAX_CHANNEL_LIMIT)?;
    let after = query_id(q.after.as_deref(), "after must be a channel id")?;
    let page = app
        .store
        .list_channels(&caller.id, after, limit)
        .await
        .map_err(ApiError::internal)?;
    let mut response = Json(page.channels).into_response();
    if let Some(next) = page.next {
        let link = format!("</api/channels?after={next}&limit={limit}>; rel=\"next\"");
        if let (Ok(cursor), Ok(link)) = (
            header::HeaderValue::from_str(&next),
            header::HeaderValue::from_str(&link),
        ) {
            let headers = response.headers_mut();
            headers.insert(NEXT_CURSOR_HEADER, cursor);
            headers.insert(header::LINK, link);
        }
    }
    Ok(response)
}

fn parse_channel_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::new(StatusCode::NOT_FOUND, "Channel not found"))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewMember {
    user_id: serde_json::Value,
}

/// `DELETE /api/channels/{id}/members/{userId}` (CONTRACT §6): the owner
/// removes anyone else, anyone removes themselves. 204 once the user's
/// sockets on this node are out and every node has been told
/// (`membership::remove`).
async fn remove_member(
    State(app): State<App>,
    Caller(caller): Caller,
    Path((id, user_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    rest_rate(&app, &caller).await?;
    let channel_id = parse_channel_id(&id)?;
    let channel = channel_or_404(&app, channel_id).await?;
    if user_id != caller.id && channel.owner_id != caller.id {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Only the owner can remove other members",
        ));
    }
    // `removedBy` is the remover, also when removing oneself (a leave is
    // the socket's `channel:leave`, with `removedBy: null`).
    match membership::remove(&app, &channel, &user_id, Some(&caller.id)).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(e @ membership::RemoveError::NotMember) => {
            Err(ApiError::new(StatusCode::NOT_FOUND, e.message()))
        }
        Err(e @ membership::RemoveError::OwnerWithMembers) => {
            Err(ApiError::new(StatusCode::CONFLICT, e.message()))
        }
        Err(membership::RemoveError::Unavailable) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Service temporarily unavailable",
        )),
    }
}

async fn add_member(
    State(app): State<App>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    body: Result<Json<NewMember>, JsonRejection>,
) -> Result<Response, ApiError> {
    rest_rate(&app, &caller).await?;
    let channel_id = parse_channel_id(&id)?;
    let Json(body) = body?;
    let user_id = body
        .user_id
        .as_str()
        .map(str::trim)
        .filter(|u| !u.is_empty() && u.len() <= 255)
        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "userId must be a non-empty string"))?
        .to_string();
    storable("userId", &user_id).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let channel = channel_or_404(&app, channel_id).await?;
    let allowed = if channel.is_private {
        channel.owner_id == caller.id
    } else {
        app.store
            .is_member(channel_id, &caller.id)
            .await
            .map_err(ApiError::internal)?
    };
    if !allowed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            if channel.is_private {
                "Only the owner can add members to a private channel"
            } else {
                "Only members can add members to this channel"
            },
        ));
    }
    match app
        .store
        .add_member(channel_id, &user_id, Some(&caller.id))
        .await
        .map_err(ApiError::internal)?
    {
        AddMember::AlreadyMember => Err(ApiError::new(
            StatusCode::CONFLICT,
            "User is already a member",
        )),
        AddMember::Added => {
            membership::announce(&app, &user_id, channel_id).await;
            Ok((
                StatusCode::CREATED,
                Json(json!({"channelId": channel_id.to_string(), "userId": user_id, "role": "member"})),
            )
                .into_response())
        }
    }
}

#[derive(Deserialize)]
struct HistoryQuery {
    before: Option<String>,
    limit: Option<String>,
    #[serde(rename = "afterSeq")]
    after_seq: Option<String>,
}

/// Largest history page.
const MAX_HISTORY_LIMIT: u64 = 100;
/// Largest catch-up page (`afterSeq`, CONTRACT §6).
const MAX_CATCH_UP_LIMIT: u64 = 1000;

/// The channel, or 404.
async fn channel_or_404(
    app: &App,
    channel_id: Uuid,
) -> Result<switchboard_shared::store::entities::channel::Model, ApiError> {
    app.store
        .channel(channel_id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "Channel not found"))
}

/// 404 for an unknown channel, 403 for a non-member.
async fn require_member(app: &App, channel_id: Uuid, caller: &Identity) -> Result<(), ApiError> {
    channel_or_404(app, channel_id).await?;
    if !app
        .store
        .is_member(channel_id, &caller.id)
        .await
        .map_err(ApiError::internal)?
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "You are not a member of this channel",
        ));
    }
    Ok(())
}

/// `GET /api/channels/{id}/presence` (CONTRACT §6, §11): the members with
/// at least one live socket anywhere, for channels of any size.
async fn presence(
    State(app): State<App>,
    Caller(caller): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let channel_id = parse_channel_id(&id)?;
    require_member(&app, channel_id, &caller).await?;
    let online = crate::presence::channel_online(&app, channel_id)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(json!({
        "channelId": channel_id.to_string(),
        "count": online.len(),
        "online": online,
    }))
    .into_response())
}

async fn history(
    State(app): State<App>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Result<Response, ApiError> {
    let channel_id = parse_channel_id(&id)?;
    // `afterSeq`: catch-up, oldest first; else history, newest first.
    let after_seq = match q.after_seq.as_deref() {
        None | Some("") => None,
        Some(a) => match a.parse::<i64>() {
            Ok(n) if n >= 0 => Some(n),
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "afterSeq must be a non-negative integer",
                ))
            }
        },
    };
    if after_seq.is_some() && q.before.as_deref().is_some_and(|b| !b.is_empty()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "before and afterSeq cannot be combined",
        ));
    }
    let max_limit = if after_seq.is_some() {
        MAX_CATCH_UP_LIMIT
    } else {
        MAX_HISTORY_LIMIT
    };
    let limit = query_limit(
        q.limit.as_deref(),
        app.settings.history_default_limit.min(max_limit),
        max_limit,
    )?;
    let before = query_id(q.before.as_deref(), "before must be a message id")?;
    require_member(&app, channel_id, &caller).await?;
    // The anchor must be a message of this channel: anything else is one
    // answer, so a member of one channel learns nothing about another's
    // message ids or positions.
    if let Some(before) = before {
        if app
            .store
            .message_seq(channel_id, before)
            .await
            .map_err(ApiError::internal)?
            .is_none()
        {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "before must be a message of this channel",
            ));
        }
    }
    let page = match after_seq {
        Some(after) => app.store.messages_after(channel_id, after, limit).await,
        None => app.store.history(channel_id, before, limit).await,
    }
    .map_err(ApiError::internal)?;
    Ok(Json(page).into_response())
}

/// A `limit` query parameter: `default` when absent, else 1..=`max` (400 otherwise).
fn query_limit(raw: Option<&str>, default: u64, max: u64) -> Result<u64, ApiError> {
    match raw {
        None | Some("") => Ok(default),
        Some(l) => match l.parse::<u64>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("limit must be an integer from 1 to {max}"),
            )),
        },
    }
}

/// An optional id query parameter (`after`, `before`); 400 with `error` when it is not a UUID.
fn query_id(raw: Option<&str>, error: &str) -> Result<Option<Uuid>, ApiError> {
    match raw {
        None | Some("") => Ok(None),
        Some(v) => Uuid::parse_str(v)
            .map(Some)
            .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, error)),
    }
}

/// Property tests of the REST query and path parsers (CONTRACT §6):
/// `limit` accepts exactly the integers 1..=max (the limit itself
/// included, one over refused, absent or empty meaning the default), ids
/// accept exactly UUIDs and round-trip, and no input panics.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// The contract's reading of a `limit`: an unsigned decimal integer
    /// (Rust's `u64` grammar: digits, optionally after one `+`) in 1..=max.
    fn model_limit(raw: &str, max: u64) -> Option<u64> {
        let digits = raw.strip_prefix('+').unwrap_or(raw);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let trimmed = digits.trim_start_matches('0');
        if trimmed.len() > 20 {
            return None;
        }
        let n: u128 = if trimmed.is_empty() {
            0
        } else {
            trimmed.parse().ok()?
        };
        (1..=u128::from(max)).contains(&n).then_some(n as u64)
    }

    /// Strings near the grammar: digits, signs, spaces, exponents, hex.
    fn limit_like() -> impl Strategy<Value = String> {
        prop_oneof![
            "[+-]?[0-9]{0,25}",
            "[ +\\-0-9eExX.]{0,8}",
            (0u64..2000).prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            ".{0,16}",
        ]
    }

    proptest! {
        #![proptest_config(crate::testing::prop_config(1024))]

        #[test]
        fn limit_accepts_exactly_one_to_max(
            raw in limit_like(),
            max in prop_oneof![Just(100u64), Just(500), Just(1000), 1u64..5000],
            default in 1u64..100,
        ) {
            let got = query_limit(Some(&raw), default, max);
            match (got, raw.is_empty(), model_limit(&raw, max)) {
                (Ok(n), true, _) => prop_assert_eq!(n, default),
                (Ok(n), false, Some(m)) => prop_assert_eq!(n, m),
                (Err(ApiError(status, msg, retry)), false, None) => {
                    prop_assert_eq!(status, StatusCode::BAD_REQUEST);
                    prop_assert_eq!(msg, format!("limit must be an integer from 1 to {max}"));
                    prop_assert_eq!(retry, None);
                }
                (got, _, model) => prop_assert!(
                    false,
                    "{:?} (max {}): got {:?}, model {:?}",
                    raw,
                    max,
                    got.map_err(|e| e.1),
                    model
                ),
            }
        }

        #[test]
        fn limit_boundaries(max in 1u64..1_000_000, default in 1u64..100) {
            prop_assert_eq!(query_limit(None, default, max).ok(), Some(default));
            prop_assert_eq!(query_limit(Some(""), default, max).ok(), Some(default));
            prop_assert_eq!(query_limit(Some(&max.to_string()), default, max).ok(), Some(max));
            prop_assert!(query_limit(Some(&(max + 1).to_string()), default, max).is_err());
            prop_assert!(query_limit(Some("0"), default, max).is_err());
            prop_assert!(query_limit(Some("-1"), default, max).is_err());
        }

        #[test]
        fn ids_accept_exactly_uuids_and_round_trip(
            raw in prop_oneof![
                ".{0,40}",
                "[0-9a-fA-F-]{30,40}",
                any::<u128>().prop_map(|v| Uuid::from_u128(v).to_string()),
            ],
            id in any::<u128>().prop_map(Uuid::from_u128),
        ) {
            prop_assert_eq!(query_id(None, "e").ok(), Some(None));
            prop_assert_eq!(query_id(Some(""), "e").ok(), Some(None));
            prop_assert_eq!(query_id(Some(&id.to_string()), "e").ok(), Some(Some(id)));
            prop_assert_eq!(parse_channel_id(&id.to_string()).ok(), Some(id));
            let expected = Uuid::parse_str(&raw).ok();
            match query_id(Some(&raw), "before must be a message id") {
                Ok(got) if !raw.is_empty() => prop_assert_eq!(got, expected),
                Ok(got) => prop_assert_eq!(got, None),
                Err(ApiError(status, msg, _)) => {
                    prop_assert!(expected.is_none());
                    prop_assert_eq!(status, StatusCode::BAD_REQUEST);
                    prop_assert_eq!(msg, "before must be a message id");
                }
            }
            match parse_channel_id(&raw) {
                Ok(got) => prop_assert_eq!(Some(got), expected),
                Err(ApiError(status, _, _)) => {
                    prop_assert!(expected.is_none());
                    prop_assert_eq!(status, StatusCode::NOT_FOUND);
                }
            }
        }
    }
}
