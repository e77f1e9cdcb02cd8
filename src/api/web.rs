//! The web console: an HTML page and its assets, embedded in the binary so that the page
//! works without network access at run time.
//!
//! `web/index.html`, `web/console.js` and `web/console.css` are the page itself. xterm.js
//! and its style sheet come from the npm package `@xterm/xterm`, which `build.rs` installs
//! from `web/package-lock.json`. A build without npm embeds empty files in their place, and
//! the page then uses its plain-text terminal.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("../../web/index.html");
const CONSOLE_JS: &str = include_str!("../../web/console.js");
const CONSOLE_CSS: &str = include_str!("../../web/console.css");
const XTERM_JS: &str = include_str!(concat!(env!("OUT_DIR"), "/web-assets/xterm.js"));
const XTERM_CSS: &str = include_str!(concat!(env!("OUT_DIR"), "/web-assets/xterm.css"));

/// Scripts and styles only from this origin, with the inline styles that xterm.js sets,
/// and no framing, so that another site cannot overlay the page's buttons.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; style-src 'self' 'unsafe-inline'; \
     img-src 'self' data:; frame-ancestors 'none'";

/// Returns whether this build embeds xterm.js, or only the page's plain-text terminal.
pub fn has_xterm() -> bool {
    !XTERM_JS.is_empty()
}

/// Builds the routes of the page (`GET /`) and its assets (`GET /assets/...`).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/assets/console.js",
            get(|| async { asset("text/javascript; charset=utf-8", CONSOLE_JS) }),
        )
        .route(
            "/assets/console.css",
            get(|| async { asset("text/css; charset=utf-8", CONSOLE_CSS) }),
        )
        .route(
            "/assets/xterm.js",
            get(|| async { asset("text/javascript; charset=utf-8", XTERM_JS) }),
        )
        .route(
            "/assets/xterm.css",
            get(|| async { asset("text/css; charset=utf-8", XTERM_CSS) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The assets change with the binary, and the binary can change under the same address.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
