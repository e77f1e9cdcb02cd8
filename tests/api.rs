//! The per-VM API of a real VMM process: malformed requests, the OpenAPI document against
//! the routes, the TCP listener's bearer token, the WebSocket console with several
//! viewers, reset, descriptors released after clients leave, live vCPU counters in the
//! metrics, and the web console page with its browser logins.

mod lifecycle_common;

use axum::http::{Method, StatusCode};
use futures_util::{SinkExt, StreamExt};
use monstervm::api::openapi::{self, OPERATIONS};
use monstervm::api::{ApiClient, VmState};
use tokio_tungstenite::tungstenite::Message;

use lifecycle_common::{fd_count, reap, wait_until, StateDir};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Sends a raw request and returns the status and the `error` field of the JSON body.
fn send(
    client: &ApiClient,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> (StatusCode, String) {
    let (status, body) = runtime()
        .block_on(client.send(method, path, content_type, body.to_vec()))
        .expect("request reaches the VMM");
    let json: serde_json::Value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| panic!("{status} body is not JSON: {body:?}"));
    let message = json["error"].as_str().unwrap_or_default().to_string();
    (status, message)
}

/// One malformed request and the error it must get.
struct Case {
    name: &'static str,
    method: Method,
    path: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: StatusCode,
    /// Words the error message must contain, such as the name of the bad field.
    words: &'static [&'static str],
}

#[test]
fn malformed_requests_get_json_errors() {
    let state = StateDir::new();
    let pid = state.start_vm("target", &[]);
    let client = ApiClient::unix(&state.socket("target"));
    let json = Some("application/json");
    let oversized = format!(r#"{{"action": "pause", "pad": "{}"}}"#, "x".repeat(20_000));

    let cases = [
        Case {
            name: "bad JSON",
            method: Method::PUT,
            path: "/vm/actions",
            content_type: json,
            body: b"{".to_vec(),
            status: StatusCode::BAD_REQUEST,
            words: &["line 1"],
        },
        Case {
            name: "not an object",
            method: Method::PUT,
            path: "/vm/actions",
            content_type: json,
            body: b"[1]".to_vec(),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            words: &["object"],
        },
        Case {
            name: "wrong type",
            method: Method::PUT,
            path: "/vm/actions",
            content_type: json,
            body: br#"{"action": 5}"#.to_vec(),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            words: &["`action`", "number"],
        },
        Case {
            name: "unknown action",
            method: Method::PUT,
            path: "/vm/actions",
            content_type: json,
            body: br#"{"action": "explode"}"#.to_vec(),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            words: &["`action`", "explode"],
        },
        Case {
            name: "unknown field",
            method: Method::PUT,
            path: "/vm/actions",
            content_type: json,
            body: br#"{"action": "pause", "when": 1}"#.to_vec(),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            words: &["`when`"],
        },
        Case {
            name: "missing field",
            method: Method::PUT,
            path: "/vm/actions",
            content_type: json,
            body: b"{}".to_vec(),
            status: StatusCode::UNPROCESSABLE_ENTITY,
            words: &["`action`"],
        },
        Case {
            name: "no content type",
            method: Method::PUT,
            path: "/vm/actions",
            content_type: None,
            body: br#"{"action": "pause"}"#.to_vec(),
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            words: &["Content-Type"],
        },
        Case {
            name: "oversized body",
            method: Method::PUT,
            path: "/vm/actions",
            content_type: json,
            body: oversized.into_bytes(),
            status: StatusCode::PAYLOAD_TOO_LARGE,
            words: &["16384"],
        },
        Case {
            name: "unknown path",
            method: Method::GET,
            path: "/vm/nothing",
            content_type: None,
            body: Vec::new(),
            status: StatusCode::NOT_FOUND,
            words: &["/vm/nothing"],
        },
        Case {
            name: "wrong method",
            method: Method::DELETE,
            path: "/vm",
            content_type: None,
            body: Vec::new(),
            status: StatusCode::METHOD_NOT_ALLOWED,
            words: &["DELETE"],
        },
        Case {
            name: "console without upgrade",
            method: Method::GET,
            path: "/vm/console",
            content_type: None,
            body: Vec::new(),
            status: StatusCode::BAD_REQUEST,
            words: &[],
        },
    ];
    for case in cases {
        let name = case.name;
        let (status, message) = send(
            &client,
            case.method,
            case.path,
            case.content_type,
            &case.body,
        );
        assert_eq!(status, case.status, "{name}: {message}");
        assert!(!message.is_empty(), "{name}: empty error message");
        for word in case.words {
            assert!(message.contains(word), "{name}: {message:?} lacks {word:?}");
        }
    }

    let info = runtime().block_on(client.info()).unwrap();
    assert_eq!(
        info.state,
        VmState::Running,
        "the VM survived the bad requests"
    );
    let vmm_log = state.ok(&["logs", "target", "--vmm"]);
    assert!(vmm_log.contains("API request rejected"), "{vmm_log}");
    state.ok(&["stop", "target"]);
    reap(pid);
}

#[test]
fn openapi_document_matches_routes() {
    let state = StateDir::new();
    let pid = state.start_vm("doc", &[]);
    let client = ApiClient::unix(&state.socket("doc"));

    let (status, body) = runtime()
        .block_on(client.send(Method::GET, "/openapi.json", None, Vec::new()))
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let served: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(served, openapi::document());

    let mut documented = Vec::new();
    for (path, item) in served["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.push((method.clone(), path.clone()));
        }
    }
    documented.sort();
    let mut listed: Vec<_> = OPERATIONS
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    listed.sort();
    assert_eq!(documented, listed);

    for (method, path) in OPERATIONS {
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let (status, _) = runtime()
            .block_on(client.send(
                method.clone(),
                path,
                Some("application/json"),
                b"{}".to_vec(),
            ))
            .unwrap();
        assert_ne!(
            status,
            StatusCode::NOT_FOUND,
            "{method} {path} is documented but not routed"
        );
        assert_ne!(
            status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path} is documented but not routed"
        );
    }
    // Every other method on a documented path is rejected, so nothing is routed silently.
    for (_, path) in OPERATIONS {
        for method in [Method::POST, Method::DELETE, Method::PATCH] {
            let (status, _) = runtime()
                .block_on(client.send(method.clone(), path, None, Vec::new()))
                .unwrap();
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        }
    }
    state.ok(&["stop", "doc"]);
    reap(pid);
}

#[test]
fn tcp_listener_requires_token() {
    let state = StateDir::new();
    let token = "test-token-0123456789";
    let pid = state.start_vm(
        "remote",
        &["--api-listen", "127.0.0.1:0", "--api-token", token],
    );
    let addr_text = std::fs::read_to_string(state.vm_dir("remote").join("api.addr")).unwrap();
    let addr = addr_text.trim().parse().unwrap();
    assert!(
        !std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .unwrap()
            .contains(token),
        "the token is visible in the VMM's command line"
    );

    let anonymous = ApiClient::tcp(addr, "");
    let (status, message) = send(&anonymous, Method::GET, "/vm", None, b"");
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(message.contains("bearer token"), "{message}");
    let wrong = ApiClient::tcp(addr, "test-token-0123456780");
    assert_eq!(
        send(&wrong, Method::GET, "/vm", None, b"").0,
        StatusCode::UNAUTHORIZED
    );
    assert!(runtime().block_on(wrong.console()).is_err());

    let client = ApiClient::tcp(addr, token);
    let info = runtime().block_on(client.info()).unwrap();
    assert_eq!(info.name, "remote");
    runtime().block_on(async {
        let mut console = client.console().await.unwrap();
        let first = console.next().await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&first.into_data()).contains("booted"));
    });

    state.ok(&["stop", "remote"]);
    reap(pid);
    assert!(!state.vm_dir("remote").join("api.addr").exists());
}

#[test]
fn short_token_is_rejected() {
    let state = StateDir::new();
    state.ok(&["create", "weak", "--memory", "16"]);
    let output = state.run(&[
        "start",
        "weak",
        "--api-listen",
        "127.0.0.1:0",
        "--api-token",
        "short",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("invalid --api-token"), "{message}");
    assert_eq!(state.status("weak")["state"], "stopped");
}

/// Receives binary frames until their bytes contain `needle`.
async fn receive_until(console: &mut monstervm::api::client::ConsoleStream, needle: &str) {
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let message = tokio::time::timeout(lifecycle_common::PATIENCE, console.next())
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} on the console; got {seen:?}"))
            .expect("console open")
            .expect("console frame");
        seen.extend_from_slice(&message.into_data());
    }
}

#[test]
fn console_serves_several_viewers() {
    let state = StateDir::new();
    let pid = state.start_vm("shared", &[]);
    let client = ApiClient::unix(&state.socket("shared"));
    let idle_fds = fd_count(pid);

    runtime().block_on(async {
        let mut first = client.console().await.unwrap();
        let mut second = client.console().await.unwrap();
        receive_until(&mut first, "booted").await;
        receive_until(&mut second, "booted").await;
        assert_eq!(client.metrics().await.unwrap().serial.viewers, 2);

        first
            .send(Message::binary(b"from-first".to_vec()))
            .await
            .unwrap();
        receive_until(&mut first, "from-first").await;
        receive_until(&mut second, "from-first").await;
        second.send(Message::text("from-second")).await.unwrap();
        receive_until(&mut first, "from-second").await;

        first.close(None).await.unwrap();
        second.close(None).await.unwrap();
    });

    wait_until("viewers to detach", || {
        runtime().block_on(client.metrics()).unwrap().serial.viewers == 0
    });
    wait_until("the VMM to close the viewers' descriptors", || {
        fd_count(pid) <= idle_fds
    });
    let metrics = runtime().block_on(client.metrics()).unwrap();
    assert_eq!(metrics.serial.bytes_in, 21);
    assert_eq!(
        metrics.exits.unwrap().pio,
        21,
        "the test double counts echoed bytes"
    );

    state.ok(&["stop", "shared"]);
    reap(pid);
}

#[test]
fn console_closes_when_vm_stops() {
    let state = StateDir::new();
    let pid = state.start_vm("ending", &[]);
    let client = ApiClient::unix(&state.socket("ending"));

    runtime().block_on(async {
        let mut console = client.console().await.unwrap();
        receive_until(&mut console, "booted").await;
        client.action(monstervm::api::VmAction::Stop).await.unwrap();
        loop {
            match tokio::time::timeout(lifecycle_common::PATIENCE, console.next()).await {
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => break,
                Ok(Some(Ok(_))) => continue,
                Err(_) => panic!("console stayed open after the VM stopped"),
            }
        }
    });

    let status = reap(pid).expect("the VMM exits");
    assert!(libc::WIFEXITED(status), "wait status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), 0);
}

#[test]
fn reset_boots_the_vm_again() {
    let state = StateDir::new();
    let pid = state.start_vm("again", &[]);
    let client = ApiClient::unix(&state.socket("again"));

    runtime()
        .block_on(client.action(monstervm::api::VmAction::Reset))
        .unwrap();

    wait_until("the second boot", || {
        let info = runtime().block_on(client.info()).unwrap();
        info.boots == 2 && info.state == VmState::Running
    });
    let serial = std::fs::read_to_string(state.vm_dir("again").join("serial.log")).unwrap();
    assert_eq!(serial.matches("VM again booted").count(), 2, "{serial}");
    assert_eq!(runtime().block_on(client.info()).unwrap().pid as i32, pid);

    state.ok(&["stop", "again"]);
    let status = reap(pid).unwrap();
    assert!(libc::WIFEXITED(status));
}

#[test]
fn embedded_guest_boots_in_vmm() {
    // The real builder and the embedded guest: KVM where it runs at hardware speed, the
    // emulator elsewhere (backend auto).
    let state = StateDir::with_real_vms();
    let pid = state.start_vm("guest", &[]);
    let client = ApiClient::unix(&state.socket("guest"));

    runtime().block_on(async {
        let mut console = client.console().await.unwrap();
        receive_until(&mut console, "Type to echo, 'q' to power off.").await;

        client
            .action(monstervm::api::VmAction::Pause)
            .await
            .unwrap();
        assert_eq!(client.info().await.unwrap().state, VmState::Paused);
        // More input than the 16550's 64-byte FIFO takes waits in the VMM while the guest
        // is paused, and the API must stay responsive meanwhile.
        let typed = "0123456789".repeat(10);
        console
            .send(Message::binary(typed.clone().into_bytes()))
            .await
            .unwrap();
        assert_eq!(client.info().await.unwrap().state, VmState::Paused);
        client
            .action(monstervm::api::VmAction::Resume)
            .await
            .unwrap();
        receive_until(&mut console, &typed).await;
        console.send(Message::binary(b"q".to_vec())).await.unwrap();
        receive_until(&mut console, "Powering off.").await;
    });

    let status = reap(pid).expect("the VMM exits when the guest powers off");
    assert!(libc::WIFEXITED(status), "wait status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), 0);
    let stopped = state.status("guest");
    assert_eq!(stopped["state"], "stopped");
    assert_eq!(stopped["last_error"], serde_json::Value::Null);
    let serial = state.ok(&["logs", "guest"]);
    assert!(
        serial.contains("Welcome to the MonsterVM embedded guest."),
        "{serial}"
    );
}

/// Checks on one backend that `GET /vm/metrics` reports exit counters while the embedded
/// guest runs, and that they grow when the guest echoes console input.
fn check_metrics_grow_with_echo(backend: &str) {
    let state = StateDir::with_real_vms();
    state.ok(&["create", "counted", "--memory", "16", "--backend", backend]);
    let pid = state.json(&["start", "counted"])["pid"].as_i64().unwrap() as i32;
    let client = ApiClient::unix(&state.socket("counted"));

    runtime().block_on(async {
        let mut console = client.console().await.unwrap();
        receive_until(&mut console, "Type to echo, 'q' to power off.").await;
        let before = client.metrics().await.unwrap();
        let exits_before = before.exits.clone().expect("exit counters while running");
        assert!(
            exits_before.pio > 0,
            "{backend}: the banner took no port I/O"
        );

        console
            .send(Message::binary(b"hello".to_vec()))
            .await
            .unwrap();
        receive_until(&mut console, "hello").await;
        let after = client.metrics().await.unwrap();
        let exits_after = after.exits.clone().expect("exit counters while running");

        // Each echoed byte takes at least a receive-buffer read and a transmit write.
        assert!(
            exits_after.pio >= exits_before.pio + 10,
            "{backend}: pio exits went from {} to {}",
            exits_before.pio,
            exits_after.pio
        );
        let instructions_before = before.instructions.expect("instruction counter");
        if backend == "emulator" {
            // The emulator publishes its instruction count when a slice ends, which may
            // come a moment after the echo reached the console.
            let deadline = tokio::time::Instant::now() + lifecycle_common::PATIENCE;
            loop {
                let now = client.metrics().await.unwrap().instructions.unwrap();
                if now > instructions_before {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "instructions stayed at {instructions_before} while the guest echoed"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        } else {
            assert_eq!(
                after.instructions,
                Some(0),
                "KVM does not count instructions"
            );
        }

        console.send(Message::binary(b"q".to_vec())).await.unwrap();
        receive_until(&mut console, "Powering off.").await;
    });

    reap(pid).expect("the VMM exits when the guest powers off");
}

#[test]
fn metrics_grow_on_emulator() {
    check_metrics_grow_with_echo("emulator");
}

#[test]
fn metrics_grow_on_kvm() {
    if !std::path::Path::new("/dev/kvm").exists() {
        assert!(
            std::env::var("MONSTERVM_REQUIRE_KVM").as_deref() != Ok("1"),
            "MONSTERVM_REQUIRE_KVM=1 but /dev/kvm is missing"
        );
        eprintln!("skipping metrics_grow_on_kvm: /dev/kvm is missing");
        return;
    }
    check_metrics_grow_with_echo("kvm");
}

/// Sends one raw HTTP/1.1 request over TCP, with no credential unless `headers` has one,
/// and returns the status and the response head and body as text.
fn raw_http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(lifecycle_common::PATIENCE))
        .unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if method == "PUT" {
        let body = r#"{"action": "pause"}"#;
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        request.push_str("\r\n");
    }
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"));
    (status, response)
}

/// Opens the console WebSocket over TCP with `headers` and no Authorization header.
async fn open_console_with(
    addr: std::net::SocketAddr,
    headers: &[(&str, &str)],
) -> Result<
    (
        tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{addr}/vm/console")
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_tungstenite::client_async(request, stream).await
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn web_console_page_is_served() {
    let state = StateDir::new();
    let token = "page-token-0123456789";
    let pid = state.start_vm(
        "page",
        &["--api-listen", "127.0.0.1:0", "--api-token", token],
    );
    let addr_text = std::fs::read_to_string(state.vm_dir("page").join("api.addr")).unwrap();
    let addr: std::net::SocketAddr = addr_text.trim().parse().unwrap();
    let bearer = format!("Bearer {token}");
    let authorized = [("Authorization", bearer.as_str())];

    for (path, content_type, needle) in [
        ("/", "text/html", "/assets/console.js"),
        ("/assets/console.js", "text/javascript", "/vm/actions"),
        ("/assets/console.css", "text/css", "#terminal"),
        ("/assets/xterm.css", "text/css", ""),
        ("/assets/xterm.js", "text/javascript", ""),
    ] {
        let (status, response) = raw_http(addr, "GET", path, &authorized);
        assert_eq!(status, 200, "{path}");
        assert!(response.contains(needle), "{path} lacks {needle:?}");
        assert!(
            response.contains(&format!("content-type: {content_type}")),
            "{path}: {response:.300}"
        );
        assert!(response.contains("content-security-policy: "), "{path}");
    }
    let (_, xterm) = raw_http(addr, "GET", "/assets/xterm.js", &authorized);
    if monstervm::api::web::has_xterm() {
        assert!(
            xterm.contains("Terminal"),
            "xterm.js is embedded but not served"
        );
    } else {
        eprintln!("this build has no xterm.js: npm was missing or failed when it was built");
    }

    // The Unix socket serves the page without credentials.
    let client = ApiClient::unix(&state.socket("page"));
    let (status, body) = runtime()
        .block_on(client.send(Method::GET, "/", None, Vec::new()))
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&body).contains("id=\"terminal\""));

    state.ok(&["stop", "page"]);
    reap(pid);
}

#[test]
fn web_login_and_wrong_tokens() {
    let state = StateDir::new();
    let token = "web-token-0123456789;=,";
    let pid = state.start_vm(
        "webauth",
        &["--api-listen", "127.0.0.1:0", "--api-token", token],
    );
    let addr_text = std::fs::read_to_string(state.vm_dir("webauth").join("api.addr")).unwrap();
    let addr: std::net::SocketAddr = addr_text.trim().parse().unwrap();

    // Without a credential the page is a login form, and the API returns JSON errors.
    let (status, page) = raw_http(addr, "GET", "/", &[]);
    assert_eq!(status, 401);
    assert!(page.contains("<form"), "{page}");
    assert_eq!(raw_http(addr, "GET", "/assets/console.js", &[]).0, 401);

    let (status, response) = raw_http(addr, "GET", "/?token=wrong-token-0123456789", &[]);
    assert_eq!(status, 401);
    assert!(
        !response.to_ascii_lowercase().contains("set-cookie"),
        "{response}"
    );

    let login = "/?token=web-token-0123456789%3B%3D%2C";
    let (status, response) = raw_http(addr, "GET", login, &[]);
    assert_eq!(status, 303, "{response}");
    let set_cookie = response
        .lines()
        .find_map(|line| line.strip_prefix("set-cookie: "))
        .unwrap_or_else(|| panic!("no cookie in {response}"));
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    assert_eq!(
        cookie,
        format!("monstervm-token-webauth={}", hex(token.as_bytes()))
    );
    assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"));

    let with_cookie = [("Cookie", cookie.as_str())];
    let (status, page) = raw_http(addr, "GET", "/", &with_cookie);
    assert_eq!(status, 200);
    assert!(page.contains("/assets/xterm.js"));
    assert_eq!(raw_http(addr, "GET", "/vm", &with_cookie).0, 200);
    let wrong_cookie = [("Cookie", "monstervm-token-webauth=00")];
    assert_eq!(raw_http(addr, "GET", "/vm", &wrong_cookie).0, 401);

    // The cookie does not work for a page on another origin.
    let cross_site = [
        ("Cookie", cookie.as_str()),
        ("Origin", "http://127.0.0.1:1"),
    ];
    assert_eq!(raw_http(addr, "PUT", "/vm/actions", &cross_site).0, 403);
    let client = ApiClient::tcp(addr, token);
    assert_eq!(
        runtime().block_on(client.info()).unwrap().state,
        VmState::Running
    );

    runtime().block_on(async {
        let origin = format!("http://{addr}");
        let (mut console, response) = open_console_with(
            addr,
            &[("Cookie", cookie.as_str()), ("Origin", origin.as_str())],
        )
        .await
        .expect("the login cookie opens the console");
        assert_eq!(response.status(), 101);
        receive_until_raw(&mut console, "booted").await;

        let protocols = format!(
            "monstervm-console, monstervm-token.{}",
            hex(token.as_bytes())
        );
        let (mut console, response) =
            open_console_with(addr, &[("Sec-WebSocket-Protocol", protocols.as_str())])
                .await
                .expect("the token subprotocol opens the console");
        assert_eq!(
            response.headers()["sec-websocket-protocol"],
            "monstervm-console"
        );
        receive_until_raw(&mut console, "booted").await;

        let wrong = "monstervm-console, monstervm-token.00";
        assert!(
            open_console_with(addr, &[("Sec-WebSocket-Protocol", wrong)])
                .await
                .is_err()
        );
        assert!(open_console_with(
            addr,
            &[
                ("Cookie", cookie.as_str()),
                ("Origin", "http://127.0.0.1:1")
            ]
        )
        .await
        .is_err());
        assert!(open_console_with(addr, &wrong_cookie).await.is_err());
    });

    state.ok(&["stop", "webauth"]);
    reap(pid);
    let log = std::fs::read_to_string(state.vm_dir("webauth").join("vmm.log")).unwrap();
    assert!(log.contains("without a valid token rejected"), "{log}");
    assert!(
        !log.contains("web-token-0123456789"),
        "the token is in vmm.log"
    );
    assert!(
        !log.contains(&hex(token.as_bytes())),
        "the token is in vmm.log"
    );
}

async fn receive_until_raw(
    console: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    needle: &str,
) {
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let message = tokio::time::timeout(lifecycle_common::PATIENCE, console.next())
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} on the console; got {seen:?}"))
            .expect("console open")
            .expect("console frame");
        seen.extend_from_slice(&message.into_data());
    }
}

/// Returns a counter from `GET /vm/metrics` that grows while the embedded guest runs:
/// instructions retired on the emulator, port-I/O exits on KVM (which counts no
/// instructions). The guest busy-polls its serial port, so both grow all the time.
async fn progress(client: &ApiClient, backend: &str) -> u64 {
    let metrics = client.metrics().await.unwrap();
    if backend == "emulator" {
        metrics
            .instructions
            .expect("the emulator publishes its instruction counter")
    } else {
        metrics.exits.expect("KVM publishes its exit counters").pio
    }
}

/// Checks on one backend that no guest code runs between the pause response and resume.
fn check_pause_parks_vcpus(backend: &str) {
    let state = StateDir::with_real_vms();
    state.ok(&["create", "parked", "--memory", "16", "--backend", backend]);
    let pid = state.json(&["start", "parked"])["pid"].as_i64().unwrap() as i32;
    let client = ApiClient::unix(&state.socket("parked"));

    runtime().block_on(async {
        let mut console = client.console().await.unwrap();
        receive_until(&mut console, "Type to echo, 'q' to power off.").await;

        client
            .action(monstervm::api::VmAction::Pause)
            .await
            .unwrap();
        let at_pause = progress(&client, backend).await;
        assert_eq!(client.info().await.unwrap().state, VmState::Paused);
        for _ in 0..10 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            assert_eq!(
                progress(&client, backend).await,
                at_pause,
                "{backend}: the guest ran after the pause request returned"
            );
        }

        client
            .action(monstervm::api::VmAction::Resume)
            .await
            .unwrap();
        assert_eq!(client.info().await.unwrap().state, VmState::Running);
        let deadline = tokio::time::Instant::now() + lifecycle_common::PATIENCE;
        while progress(&client, backend).await == at_pause {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{backend}: the guest did not run after resume"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }

        console.send(Message::binary(b"q".to_vec())).await.unwrap();
        receive_until(&mut console, "Powering off.").await;
    });

    let status = reap(pid).expect("the VMM exits when the guest powers off");
    assert!(
        libc::WIFEXITED(status),
        "{backend}: wait status {status:#x}"
    );
}

#[test]
fn pause_parks_vcpus_on_emulator() {
    check_pause_parks_vcpus("emulator");
}

#[test]
fn pause_parks_vcpus_on_kvm() {
    if !std::path::Path::new("/dev/kvm").exists() {
        assert!(
            std::env::var("MONSTERVM_REQUIRE_KVM").as_deref() != Ok("1"),
            "MONSTERVM_REQUIRE_KVM=1 but /dev/kvm is missing"
        );
        eprintln!("skipping pause_parks_vcpus_on_kvm: /dev/kvm is missing");
        return;
    }
    check_pause_parks_vcpus("kvm");
}

#[test]
fn shutdown_and_forced_stop_actions() {
    let state = StateDir::with_real_vms();
    state.ok(&["create", "asked", "--memory", "16", "--backend", "emulator"]);
    let pid = state.json(&["start", "asked"])["pid"].as_i64().unwrap() as i32;
    let client = ApiClient::unix(&state.socket("asked"));

    runtime().block_on(async {
        let mut console = client.console().await.unwrap();
        receive_until(&mut console, "Type to echo, 'q' to power off.").await;

        client
            .action(monstervm::api::VmAction::Shutdown)
            .await
            .unwrap();
        receive_until(&mut console, "Ctrl-Alt-Del pressed.").await;
    });
    let status = reap(pid).expect("the VMM exits when the guest powers off");
    assert!(libc::WIFEXITED(status), "wait status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), 0);

    // A paused guest cannot respond, so only a forced stop ends it without SIGKILL.
    state.ok(&[
        "create",
        "frozen",
        "--memory",
        "16",
        "--backend",
        "emulator",
    ]);
    let pid = state.json(&["start", "frozen"])["pid"].as_i64().unwrap() as i32;
    let client = ApiClient::unix(&state.socket("frozen"));
    runtime().block_on(async {
        client
            .action(monstervm::api::VmAction::Pause)
            .await
            .unwrap();
        client
            .action(monstervm::api::VmAction::ForceStop)
            .await
            .unwrap();
    });
    let status = reap(pid).expect("the VMM exits on a forced stop");
    assert!(libc::WIFEXITED(status), "wait status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), 0);
    let vmm_log = std::fs::read_to_string(state.vm_dir("frozen").join("vmm.log")).unwrap();
    assert!(
        vmm_log.contains("the VMM ended the vCPUs on request"),
        "{vmm_log}"
    );
}
