//! A client of the per-VM API, used by the CLI and the tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::WebSocketStream;

use crate::api::handle::{VmAction, VmInfo, VmMetrics};

/// Errors raised by [`ApiClient`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("failed to connect to the VM API at {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with the VM API at {endpoint} failed")]
    Http {
        endpoint: String,
        #[source]
        source: hyper::Error,
    },
    #[error("WebSocket handshake with the VM API at {endpoint} failed")]
    WebSocket {
        endpoint: String,
        #[source]
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
    #[error("the VM API at {endpoint} did not respond within {secs} s: the VMM may be stopped or overloaded")]
    TimedOut { endpoint: String, secs: u64 },
    #[error("the VM API returned {status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("the VM API returned a body that is not the expected JSON")]
    Decode {
        #[source]
        source: serde_json::Error,
    },
}

/// Address of the API.
#[derive(Debug, Clone)]
enum Endpoint {
    Unix(PathBuf),
    Tcp { addr: SocketAddr, token: String },
}

/// Time a request (or the console handshake) may take before it fails, so that a
/// stopped or wedged VMM cannot hang the CLI.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection-per-request client of one VM's API.
#[derive(Debug, Clone)]
pub struct ApiClient {
    endpoint: Endpoint,
    timeout: Duration,
}

/// An open console connection.
pub type ConsoleStream = WebSocketStream<Box<dyn Stream>>;

/// A byte stream that the HTTP and WebSocket clients can run over.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

impl ApiClient {
    /// Creates a client of the API on the Unix socket at `socket`.
    pub fn unix(socket: &Path) -> ApiClient {
        ApiClient {
            endpoint: Endpoint::Unix(socket.to_path_buf()),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Creates a client of the API on TCP at `addr` that sends `token` as a bearer token.
    pub fn tcp(addr: SocketAddr, token: &str) -> ApiClient {
        ApiClient {
            endpoint: Endpoint::Tcp {
                addr,
                token: token.to_string(),
            },
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Replaces [`DEFAULT_TIMEOUT`] for each request.
    pub fn with_timeout(mut self, timeout: Duration) -> ApiClient {
        self.timeout = timeout;
        self
    }

    async fn within<T>(
        &self,
        future: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        tokio::time::timeout(self.timeout, future)
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::TimedOut {
                    endpoint: self.describe(),
                    secs: self.timeout.as_secs(),
                })
            })
    }

    fn describe(&self) -> String {
        match &self.endpoint {
            Endpoint::Unix(path) => path.display().to_string(),
            Endpoint::Tcp { addr, .. } => addr.to_string(),
        }
    }

    async fn connect(&self) -> Result<Box<dyn Stream>, ClientError> {
        let connect_error = |source| ClientError::Connect {
            endpoint: self.describe(),
            source,
        };
        Ok(match &self.endpoint {
            Endpoint::Unix(path) => {
                Box::new(UnixStream::connect(path).await.map_err(connect_error)?)
            }
            Endpoint::Tcp { addr, .. } => {
                Box::new(TcpStream::connect(addr).await.map_err(connect_error)?)
            }
        })
    }

    /// Sends one request and returns the status and body, whatever the status.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        self.within(self.exchange(method, path, content_type, body))
            .await
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let http_error = |source| ClientError::Http {
            endpoint: self.describe(),
            source,
        };
        let stream = self.connect().await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http_error)?;
        let connection = tokio::spawn(connection);

        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "localhost");
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        if let Endpoint::Tcp { token, .. } = &self.endpoint {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .expect("method, path and headers built here are valid");

        let response = sender.send_request(request).await.map_err(http_error)?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(http_error)?
            .to_bytes();
        drop(sender);
        // The connection task ends once the sender is gone; its result adds nothing.
        let _ = connection.await;
        Ok((status, body))
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let (status, body) = self.send(Method::GET, path, None, Vec::new()).await?;
        check_status(status, &body)?;
        serde_json::from_slice(&body).map_err(|source| ClientError::Decode { source })
    }

    /// `GET /vm`.
    pub async fn info(&self) -> Result<VmInfo, ClientError> {
        self.get_json("/vm").await
    }

    /// `GET /vm/metrics`.
    pub async fn metrics(&self) -> Result<VmMetrics, ClientError> {
        self.get_json("/vm/metrics").await
    }

    /// `PUT /vm/actions`.
    pub async fn action(&self, action: VmAction) -> Result<(), ClientError> {
        let body = serde_json::to_vec(&action.request_body()).expect("JSON values serialize");
        let (status, body) = self
            .send(Method::PUT, "/vm/actions", Some("application/json"), body)
            .await?;
        check_status(status, &body)
    }

    /// Opens the serial console WebSocket at `GET /vm/console`.
    pub async fn console(&self) -> Result<ConsoleStream, ClientError> {
        self.within(self.open_console()).await
    }

    async fn open_console(&self) -> Result<ConsoleStream, ClientError> {
        let stream = self.connect().await?;
        let mut request = "ws://localhost/vm/console"
            .into_client_request()
            .expect("the console URL is valid");
        if let Endpoint::Tcp { token, .. } = &self.endpoint {
            let value = format!("Bearer {token}")
                .parse()
                .expect("a token that passed the CLI's check is a valid header value");
            request.headers_mut().insert(header::AUTHORIZATION, value);
        }
        let (socket, _response) = tokio_tungstenite::client_async(request, stream)
            .await
            .map_err(|source| ClientError::WebSocket {
                endpoint: self.describe(),
                source: Box::new(source),
            })?;
        Ok(socket)
    }
}

/// Turns an error status into [`ClientError::Status`] with the server's message.
fn check_status(status: StatusCode, body: &[u8]) -> Result<(), ClientError> {
    if status.is_success() {
        return Ok(());
    }
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|value| value.get("error")?.as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    Err(ClientError::Status { status, message })
}
