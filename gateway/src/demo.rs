//! The demo page, served at `/` in embedded or development mode only (when
//! HS256 development tokens are accepted): plain HTML and JavaScript with the
//! `socket.io-client` bundle served from here, no CDN.

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use std::time::Duration;

use crate::state::App;

/// Lifetime of a token handed out by the demo page.
const DEMO_TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);

pub fn router(app: App) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { Html(include_str!("../demo/index.html")) }),
        )
        .route(
            "/demo/app.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    include_str!("../demo/app.js"),
                )
            }),
        )
        .route(
            "/demo/socket.io.min.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    include_str!("../demo/socket.io.min.js"),
                )
            }),
        )
        .route("/demo/token", get(token))
        .with_state(app)
}

#[derive(Deserialize)]
struct TokenQuery {
    user: String,
    name: Option<String>,
}

/// `GET /demo/token?user=alice`: a development token for the demo page.
async fn token(State(app): State<App>, Query(q): Query<TokenQuery>) -> Response {
    let user = q.user.trim();
    if user.is_empty() || user.len() > 64 {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"error": "user must be 1 to 64 characters"})),
        )
            .into_response();
    }
    let Some(secret) = app.settings.auth_dev_secret.as_deref() else {
        return (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "not in development mode"})),
        )
            .into_response();
    };
    match crate::auth::dev_token(secret, user, q.name.as_deref(), DEMO_TOKEN_TTL) {
        Ok(t) => Json(serde_json::json!({"token": t, "userId": user})).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}
