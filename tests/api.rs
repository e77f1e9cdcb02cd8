//! The per-VM API of a real VMM process: malformed requests, the OpenAPI document against
//! the routes, the TCP listener's bearer token, the WebSocket console with several
//! viewers, reset, and descriptors released after clients leave.

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
        let instructions_after = after.instructions.expect("instruction counter");
        if backend == "emulator" {
            assert!(
                instructions_after > instructions_before,
                "instructions went from {instructions_before} to {instructions_after}"
            );
        } else {
            assert_eq!(instructions_after, 0, "KVM does not count instructions");
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
