//! The per-VM HTTP API: axum routes over a [`VmHandle`].
//!
//! | method | path | body | response |
//! | --- | --- | --- | --- |
//! | GET | `/vm` | | [`VmInfo`](crate::api::VmInfo) |
//! | PUT | `/vm/actions` | `{"action": "pause"\|"resume"\|"stop"\|"shutdown"\|"reset", "force": bool}` | 204 |
//! | GET | `/vm/metrics` | | [`VmMetrics`](crate::api::VmMetrics) |
//! | GET | `/vm/console` | WebSocket upgrade | binary frames both ways |
//! | GET | `/openapi.json` | | OpenAPI 3.0 document |
//! | GET | `/`, `/assets/...` | | the web console page ([`crate::api::web`]) |
//!
//! Every error is JSON `{"error": "..."}` with a 4xx or 5xx status. The Unix socket needs no
//! credentials because its file mode admits only the owner. A TCP listener requires the
//! token on every request, as a bearer token or in the ways [`crate::api::auth`] lists.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{broadcast, watch};

use crate::api::auth::{self, TokenAuth, CONSOLE_PROTOCOL};
use crate::api::handle::{ActionError, VmAction, VmHandle, VmInfo, VmMetrics};
use crate::api::{openapi, web};

/// Largest request body accepted, in bytes; an action request is about 20 bytes.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Largest WebSocket message a console viewer may send, in bytes.
pub const MAX_CONSOLE_MESSAGE_BYTES: usize = 64 * 1024;

/// A JSON error response: `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({ "error": self.message }));
        (self.status, body).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        let status = rejection.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("request body exceeds the {MAX_BODY_BYTES}-byte limit")
        } else {
            // Syntax errors and a missing Content-Type: axum's text gives the line and
            // column or the expected header.
            rejection.body_text()
        };
        ApiError::new(status, message)
    }
}

/// Parses the body of `PUT /vm/actions`: `{"action": ACTION}` with ACTION one of pause,
/// resume, stop, shutdown or reset, and for stop an optional boolean `force`.
///
/// serde's own messages are vague for this shape (an integer action reads as a syntax
/// error), so each case gets a message that names the field and the accepted values.
pub fn parse_action(body: &serde_json::Value) -> Result<VmAction, ApiError> {
    let invalid = |message: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message);
    let Some(object) = body.as_object() else {
        return Err(invalid(format!(
            "the body must be a JSON object like {{\"action\": \"pause\"}}, not {}",
            json_type(body)
        )));
    };
    if let Some(unknown) = object
        .keys()
        .find(|key| *key != "action" && *key != "force")
    {
        return Err(invalid(format!(
            "unknown field `{unknown}`: the body takes only `action` and `force`"
        )));
    }
    let value = object
        .get("action")
        .ok_or_else(|| invalid("missing field `action`".to_string()))?;
    let Some(name) = value.as_str() else {
        return Err(invalid(format!(
            "field `action` must be a string ({ACTION_NAMES}), not {}",
            json_type(value)
        )));
    };
    let action: VmAction = serde_json::from_value(value.clone()).map_err(|_| {
        invalid(format!(
            "unknown value {name:?} in field `action`: expected {ACTION_NAMES}"
        ))
    })?;
    let force = match object.get("force") {
        None => false,
        Some(serde_json::Value::Bool(force)) => *force,
        Some(other) => {
            return Err(invalid(format!(
                "field `force` must be a boolean, not {}",
                json_type(other)
            )))
        }
    };
    match (action, force) {
        (VmAction::Stop, true) => Ok(VmAction::ForceStop),
        (_, false) => Ok(action),
        (action, true) => Err(invalid(format!(
            "field `force` applies only to stop, not to {action}"
        ))),
    }
}

/// The values of field `action`, for error messages.
const ACTION_NAMES: &str = "pause, resume, stop, shutdown or reset";

fn json_type(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[derive(Clone)]
struct ApiState {
    handle: Arc<dyn VmHandle>,
    /// Becomes true when the VM has ended, so console sessions close and the server drains.
    shutdown: watch::Receiver<bool>,
    vm_name: Arc<str>,
}

/// Builds the API routes and the web console for `handle`. When `token` is set, every
/// request must carry it (see [`crate::api::auth`]). Console sessions end when `shutdown`
/// becomes true.
pub fn router(
    handle: Arc<dyn VmHandle>,
    shutdown: watch::Receiver<bool>,
    token: Option<String>,
) -> Router {
    let vm_name: Arc<str> = handle.info().name.into();
    let state = ApiState {
        handle,
        shutdown,
        vm_name: vm_name.clone(),
    };
    let mut router = Router::new()
        .route("/vm", get(get_vm))
        .route("/vm/actions", put(put_action))
        .route("/vm/metrics", get(get_metrics))
        .route("/vm/console", get(get_console))
        .route("/openapi.json", get(get_openapi))
        .merge(web::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(vm_name.clone(), log_errors))
        .with_state(state);
    if let Some(token) = token {
        let auth = Arc::new(TokenAuth::new(&token, &vm_name));
        router = router.layer(middleware::from_fn_with_state(auth, auth::require_token));
    }
    router
}

async fn get_vm(State(state): State<ApiState>) -> Json<VmInfo> {
    Json(state.handle.info())
}

async fn get_metrics(State(state): State<ApiState>) -> Json<VmMetrics> {
    Json(state.handle.metrics())
}

async fn get_openapi() -> Json<serde_json::Value> {
    Json(openapi::document())
}

async fn put_action(
    State(state): State<ApiState>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(body) = body?;
    let action = parse_action(&body)?;
    // A pause blocks until every vCPU has parked, so it runs off the async threads.
    let handle = state.handle.clone();
    let result = tokio::task::spawn_blocking(move || handle.action(action))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the {action} action failed: {e}"),
            )
        })?;
    result.map_err(|e| {
        let status = match e {
            ActionError::InvalidState { .. } | ActionError::NoShutdownRequest { .. } => {
                StatusCode::CONFLICT
            }
            ActionError::PauseTimedOut { .. } => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    })?;
    Ok(StatusCode::NO_CONTENT)
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no such API path: {}; GET /openapi.json lists the routes",
            request.uri().path()
        ),
    )
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "method {} is not allowed on {}; GET /openapi.json lists the routes",
            request.method(),
            request.uri().path()
        ),
    )
}

/// Logs every error response with the VM name, so that `vmm.log` shows rejected requests.
async fn log_errors(State(vm): State<Arc<str>>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    let status = response.status();
    if status.is_server_error() {
        tracing::error!(vm = %vm, %method, %path, %status, "API request failed");
    } else if status.is_client_error() {
        tracing::info!(vm = %vm, %method, %path, %status, "API request rejected");
    }
    response
}

async fn get_console(
    State(state): State<ApiState>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let upgrade = upgrade.map_err(|rejection| {
        ApiError::new(
            rejection.status(),
            format!(
                "GET /vm/console needs a WebSocket upgrade request: {}",
                rejection.body_text()
            ),
        )
    })?;
    // A browser that offered subprotocols fails the handshake unless one is selected.
    Ok(upgrade
        .protocols([CONSOLE_PROTOCOL])
        .max_message_size(MAX_CONSOLE_MESSAGE_BYTES)
        .on_upgrade(move |socket| serve_console(socket, state)))
}

/// Streams serial output to one viewer and forwards its input until either side closes or
/// the VM ends.
async fn serve_console(socket: WebSocket, state: ApiState) {
    let (history, mut live, _viewer) = state.handle.subscribe_serial().into_parts();
    let (mut sender, mut receiver) = socket.split();
    let mut shutdown = state.shutdown.clone();
    tracing::debug!(vm = %state.vm_name, "console viewer attached");

    if !history.is_empty() && sender.send(Message::Binary(history.into())).await.is_err() {
        return;
    }
    let mut lost_chunks = 0u64;
    loop {
        tokio::select! {
            output = live.recv() => match output {
                Ok(bytes) => {
                    if sender.send(Message::Binary(bytes)).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(count)) => lost_chunks += count,
                Err(broadcast::error::RecvError::Closed) => break,
            },
            input = receiver.next() => match input {
                Some(Ok(Message::Binary(bytes))) => state.handle.send_serial(&bytes),
                Some(Ok(Message::Text(text))) => state.handle.send_serial(text.as_bytes()),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | None => break,
                Some(Err(error)) => {
                    tracing::info!(vm = %state.vm_name, %error, "console connection failed");
                    break;
                }
            },
            // The guard that wait_for returns is not Send, so drop it inside the future.
            _ = async { shutdown.wait_for(|ended| *ended).await.map(|_| ()) } => {
                // The guest's last words (such as a power-off message) are already queued,
                // because the vCPU wrote them before it ended the VM: send them first.
                while let Ok(bytes) = live.try_recv() {
                    if sender.send(Message::Binary(bytes)).await.is_err() {
                        break;
                    }
                }
                let _ = sender.send(Message::Close(None)).await;
                break;
            }
        }
    }
    if lost_chunks > 0 {
        tracing::warn!(vm = %state.vm_name, lost_chunks, "slow console viewer lost serial output");
    }
    tracing::debug!(vm = %state.vm_name, "console viewer detached");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_body_errors_name_the_field() {
        let cases = [
            (
                serde_json::json!({"action": 5}),
                "`action` must be a string",
            ),
            (
                serde_json::json!({"action": "explode"}),
                "\"explode\" in field `action`",
            ),
            (
                serde_json::json!({"action": "pause", "x": 1}),
                "unknown field `x`",
            ),
            (serde_json::json!({}), "missing field `action`"),
            (
                serde_json::json!({"action": "stop", "force": "yes"}),
                "`force` must be a boolean",
            ),
            (
                serde_json::json!({"action": "pause", "force": true}),
                "`force` applies only to stop",
            ),
            (serde_json::json!(["pause"]), "must be a JSON object"),
        ];
        for (body, expected) in cases {
            let error = parse_action(&body).unwrap_err();
            assert_eq!(error.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
            assert!(
                error.message.contains(expected),
                "{body}: {}",
                error.message
            );
        }
        let body = serde_json::json!({"action": "reset"});
        assert_eq!(parse_action(&body).unwrap(), VmAction::Reset);
        let body = serde_json::json!({"action": "shutdown"});
        assert_eq!(parse_action(&body).unwrap(), VmAction::Shutdown);
        let body = serde_json::json!({"action": "stop", "force": false});
        assert_eq!(parse_action(&body).unwrap(), VmAction::Stop);
        let body = serde_json::json!({"action": "stop", "force": true});
        assert_eq!(parse_action(&body).unwrap(), VmAction::ForceStop);
        assert_eq!(
            parse_action(&VmAction::ForceStop.request_body()).unwrap(),
            VmAction::ForceStop
        );
    }
}
