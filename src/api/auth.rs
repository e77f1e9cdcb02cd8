//! Token checks of the TCP listener.
//!
//! A request is accepted with any one of these credentials:
//!
//! | credential | sent by |
//! | --- | --- |
//! | `Authorization: Bearer TOKEN` | `monstervm`, curl and other HTTP clients |
//! | the cookie `monstervm-token-VMNAME` | a browser after it opened `/?token=TOKEN` once |
//! | `Sec-WebSocket-Protocol: monstervm-console, monstervm-token.HEX` | WebSocket clients that cannot set headers |
//!
//! HEX is the token's bytes in lowercase hexadecimal, because a token may contain
//! characters that a cookie value or a subprotocol name cannot. `GET /?token=TOKEN` sets
//! the cookie and redirects to `/`, so that the token does not stay in the address bar
//! (the browser may still keep the login URL in its history). The cookie is `HttpOnly`
//! and `SameSite=Strict`. A request that carries it is also rejected when its `Origin` is
//! another origin, so a page elsewhere cannot use the cookie to open the console or press
//! a button. No log line contains a token: the logs name the path only, never the query.

use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};

use crate::api::server::ApiError;

/// The subprotocol that the console WebSocket selects. A client that sends its token as a
/// subprotocol must offer this one too, because a browser fails a handshake in which the
/// server selects none of the offered protocols.
pub const CONSOLE_PROTOCOL: &str = "monstervm-console";
/// Prefix of the subprotocol that carries the token in hexadecimal.
pub const TOKEN_PROTOCOL_PREFIX: &str = "monstervm-token.";
/// Prefix of the login cookie's name; the VM name follows it. Browsers share cookies
/// between ports, so the name keeps the logins of several VMs on one host apart.
pub const COOKIE_PREFIX: &str = "monstervm-token-";

const LOGIN_PAGE: &str = r#"<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>MonsterVM console login</title></head>
<body style="font-family: system-ui, sans-serif; margin: 2rem">
<h1 style="font-size: 1.2rem">MonsterVM console</h1>
<p>This API listens on TCP and needs the token given to <code>monstervm start --api-token</code>.</p>
<form method="get" action="/">
<label>Token <input name="token" type="password" autocomplete="current-password" autofocus></label>
<button type="submit">Log in</button>
</form>
</body>
</html>
"#;

/// The expected token of one TCP listener.
pub struct TokenAuth {
    token: Arc<str>,
    token_hex: String,
    cookie_name: String,
}

/// The credential that a request presented, and whether it was right.
#[derive(Debug, PartialEq, Eq)]
enum Presented {
    Bearer,
    Cookie,
    Subprotocol,
    /// `GET /?token=TOKEN` with the right token.
    Login,
    /// No credential at all.
    Missing,
    /// A credential with a wrong token.
    Wrong,
}

impl TokenAuth {
    /// Creates the check for `token` on the listener of VM `vm_name`.
    pub fn new(token: &str, vm_name: &str) -> TokenAuth {
        TokenAuth {
            token: token.into(),
            token_hex: to_hex(token.as_bytes()),
            cookie_name: format!("{COOKIE_PREFIX}{vm_name}"),
        }
    }

    fn matches(&self, presented: &str) -> bool {
        tokens_match(presented.as_bytes(), self.token.as_bytes())
    }

    fn matches_hex(&self, presented: &str) -> bool {
        tokens_match(
            presented.to_ascii_lowercase().as_bytes(),
            self.token_hex.as_bytes(),
        )
    }

    /// Finds the first credential in the request and checks it. A wrong credential is not
    /// made good by a right one further down the list.
    fn check(&self, method: &Method, uri: &axum::http::Uri, headers: &HeaderMap) -> Presented {
        let verdict = |ok: bool, kind: Presented| if ok { kind } else { Presented::Wrong };

        if let Some(token) = query_token(uri) {
            return verdict(
                method == Method::GET && uri.path() == "/" && self.matches(&token),
                Presented::Login,
            );
        }
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let bearer = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer "));
            return verdict(bearer.is_some_and(|t| self.matches(t)), Presented::Bearer);
        }
        if let Some(value) = find_cookie(headers, &self.cookie_name) {
            return verdict(self.matches_hex(&value), Presented::Cookie);
        }
        if let Some(value) = find_token_protocol(headers) {
            return verdict(self.matches_hex(&value), Presented::Subprotocol);
        }
        Presented::Missing
    }

    fn login_cookie(&self) -> HeaderValue {
        let cookie = format!(
            "{}={}; Path=/; HttpOnly; SameSite=Strict",
            self.cookie_name, self.token_hex
        );
        HeaderValue::from_str(&cookie)
            .expect("a cookie of hex digits and name characters is a valid header value")
    }
}

/// Middleware of the TCP router: passes requests with a valid credential and rejects the
/// rest with 401, or 403 for a cookie sent from another site.
pub async fn require_token(
    State(auth): State<Arc<TokenAuth>>,
    request: Request,
    next: Next,
) -> Response {
    let presented = auth.check(request.method(), request.uri(), request.headers());
    let path = request.uri().path().to_string();
    match presented {
        Presented::Bearer | Presented::Subprotocol => next.run(request).await,
        Presented::Cookie if is_cross_origin(request.headers()) => {
            tracing::info!(%path, "API request with the login cookie from another origin rejected");
            ApiError::new(
                StatusCode::FORBIDDEN,
                "cross-origin request rejected: the login cookie is valid only on pages that this API serves",
            )
            .into_response()
        }
        Presented::Cookie => next.run(request).await,
        Presented::Login => {
            tracing::info!("web console login accepted; setting the login cookie");
            let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
            response
                .headers_mut()
                .insert(header::SET_COOKIE, auth.login_cookie());
            response
        }
        Presented::Missing | Presented::Wrong => {
            tracing::info!(%path, missing = presented == Presented::Missing, "API request without a valid token rejected");
            unauthorized(&path)
        }
    }
}

fn unauthorized(path: &str) -> Response {
    let mut response = if path == "/" {
        (StatusCode::UNAUTHORIZED, Html(LOGIN_PAGE)).into_response()
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token in the Authorization header \
             (a browser logs in by opening /?token=TOKEN)",
        )
        .into_response()
    };
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Returns the `token` query parameter, decoded, if the query has one.
fn query_token(uri: &axum::http::Uri) -> Option<String> {
    uri.query()?;
    let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(uri).ok()?;
    pairs
        .into_iter()
        .find(|(name, _)| name == "token")
        .map(|(_, value)| value)
}

fn find_cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(cookie, _)| *cookie == name)
        .map(|(_, value)| value.to_string())
}

fn find_token_protocol(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .find_map(|protocol| protocol.trim().strip_prefix(TOKEN_PROTOCOL_PREFIX))
        .map(str::to_string)
}

/// Returns whether the request names an `Origin` whose host differs from its `Host`.
/// Browsers send `Origin` with every WebSocket handshake and every PUT.
fn is_cross_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return false;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin.to_str().ok().and_then(|o| {
        o.strip_prefix("http://")
            .or_else(|| o.strip_prefix("https://"))
    });
    match (origin_host, host) {
        (Some(origin_host), Some(host)) => !origin_host.eq_ignore_ascii_case(host),
        _ => true,
    }
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares in time that depends only on the lengths, so that a client cannot find the
/// token byte by byte from response times.
fn tokens_match(presented: &[u8], expected: &[u8]) -> bool {
    if presented.len() != expected.len() {
        return false;
    }
    presented
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "s3cret;token=,x";

    fn check(method: Method, uri: &str, headers: &[(&str, &str)]) -> Presented {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        TokenAuth::new(TOKEN, "web").check(&method, &uri.parse().unwrap(), &map)
    }

    #[test]
    fn token_comparison() {
        assert!(tokens_match(b"secret", b"secret"));
        assert!(!tokens_match(b"secreT", b"secret"));
        assert!(!tokens_match(b"secret1", b"secret"));
        assert!(!tokens_match(b"", b"secret"));
    }

    #[test]
    fn credentials_are_checked() {
        let hex = to_hex(TOKEN.as_bytes());
        let cookie = format!("other=1; monstervm-token-web={hex}");
        let protocols = format!("monstervm-console, monstervm-token.{hex}");
        let encoded_login = "/?token=s3cret%3Btoken%3D%2Cx";
        type Case<'a> = (&'a str, Method, &'a str, Vec<(&'a str, &'a str)>, Presented);
        let cases: [Case; 11] = [
            (
                "no credential",
                Method::GET,
                "/vm",
                vec![],
                Presented::Missing,
            ),
            (
                "bearer",
                Method::GET,
                "/vm",
                vec![("authorization", "Bearer s3cret;token=,x")],
                Presented::Bearer,
            ),
            (
                "wrong bearer",
                Method::GET,
                "/vm",
                vec![("authorization", "Bearer s3cret;token=,y")],
                Presented::Wrong,
            ),
            (
                "cookie",
                Method::PUT,
                "/vm/actions",
                vec![("cookie", &cookie)],
                Presented::Cookie,
            ),
            (
                "wrong cookie",
                Method::GET,
                "/vm",
                vec![("cookie", "monstervm-token-web=00")],
                Presented::Wrong,
            ),
            (
                "another VM's cookie",
                Method::GET,
                "/vm",
                vec![("cookie", "monstervm-token-db=00")],
                Presented::Missing,
            ),
            (
                "subprotocol",
                Method::GET,
                "/vm/console",
                vec![("sec-websocket-protocol", &protocols)],
                Presented::Subprotocol,
            ),
            (
                "wrong subprotocol",
                Method::GET,
                "/vm/console",
                vec![(
                    "sec-websocket-protocol",
                    "monstervm-console, monstervm-token.00",
                )],
                Presented::Wrong,
            ),
            (
                "login",
                Method::GET,
                encoded_login,
                vec![],
                Presented::Login,
            ),
            (
                "wrong login",
                Method::GET,
                "/?token=guess",
                vec![("cookie", &cookie)],
                Presented::Wrong,
            ),
            (
                "login on another path",
                Method::GET,
                "/vm?token=s3cret%3Btoken%3D%2Cx",
                vec![],
                Presented::Wrong,
            ),
        ];
        for (name, method, uri, headers, expected) in cases {
            assert_eq!(check(method, uri, &headers), expected, "{name}");
        }
    }

    #[test]
    fn cross_origin_cookie_requests_are_detected() {
        let headers = |origin: Option<&str>| {
            let mut map = HeaderMap::new();
            map.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
            if let Some(origin) = origin {
                map.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
            }
            map
        };
        assert!(!is_cross_origin(&headers(None)));
        assert!(!is_cross_origin(&headers(Some("http://127.0.0.1:8080"))));
        assert!(is_cross_origin(&headers(Some("http://127.0.0.1:9090"))));
        assert!(is_cross_origin(&headers(Some("https://evil.example"))));
        assert!(is_cross_origin(&headers(Some("null"))));
    }

    #[test]
    fn login_cookie_is_http_only_and_same_site() {
        let cookie = TokenAuth::new(TOKEN, "web").login_cookie();
        let cookie = cookie.to_str().unwrap();
        assert!(
            cookie.starts_with("monstervm-token-web=733363726574"),
            "{cookie}"
        );
        assert!(cookie.contains("HttpOnly"), "{cookie}");
        assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    }
}
