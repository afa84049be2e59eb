//! The demo page, served at `/` in embedded or development mode.

use axum::response::Html;
use axum::routing::get;
use axum::Router;

use crate::state::App;

pub fn router() -> Router<()> {
    Router::new().route(
        "/",
        get(|| async { Html(include_str!("../demo/index.html")) }),
    )
}

#[allow(dead_code)]
fn _assert_state(_: App) {}
