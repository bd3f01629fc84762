//! The browser client and demo page, embedded in the binary so that
//! `wsproto-server` serves them with nothing else installed.
//!
//! `/` is a chat room plus a live chart of topic `demo.value`; `/wsproto.js`
//! is the dependency-free client module pages can import.

use axum::{
    http::{header, HeaderValue},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};

const INDEX_HTML: &str = include_str!("../web/index.html");
const DEMO_JS: &str = include_str!("../web/demo.js");
const WSPROTO_JS: &str = include_str!("../web/wsproto.js");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    (headers, body).into_response()
}

/// Routes for the demo page and the client module.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/demo.js",
            get(|| async { asset("text/javascript; charset=utf-8", DEMO_JS) }),
        )
        .route(
            "/wsproto.js",
            get(|| async { asset("text/javascript; charset=utf-8", WSPROTO_JS) }),
        )
}
