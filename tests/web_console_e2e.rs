//! The web console end to end in headless Chromium. A real VM runs the embedded guest
//! with a TCP listener, the browser opens the page through its `?token=` login, pauses and
//! resumes the VM and types "hello" into the terminal, the guest echoes it, and the Stop
//! button ends the VM.
//!
//! Chromium is driven by `web/e2e/console.mjs` with Node's playwright-core. The test needs
//! Debian's `chromium` (`/usr/bin/chromium`), Node.js and `npm ci --prefix web`. Where one
//! is missing it skips with a message, and under `CI=true` it fails instead.

mod lifecycle_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use lifecycle_common::{reap, StateDir};

const CHROMIUM: &str = "/usr/bin/chromium";
const TOKEN: &str = "e2e-token-0123456789";

/// Returns why the browser test cannot run here, if it cannot.
fn missing_prerequisite(web_dir: &Path) -> Option<String> {
    if !Path::new(CHROMIUM).exists() {
        return Some(format!(
            "{CHROMIUM} is missing; run apt-get install chromium"
        ));
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Some("node is missing; install Node.js".to_string());
    }
    if !web_dir.join("node_modules/playwright-core").exists() {
        return Some("playwright-core is missing; run npm ci --prefix web".to_string());
    }
    None
}

#[test]
fn browser_types_echo_and_stops() {
    let web_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("web");
    if let Some(reason) = missing_prerequisite(&web_dir) {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but the browser test cannot run: {reason}"
        );
        eprintln!("skipping browser_types_echo_and_stops: {reason}");
        return;
    }

    let state = StateDir::with_real_vms();
    let pid = state.start_vm(
        "browser",
        &["--api-listen", "127.0.0.1:0", "--api-token", TOKEN],
    );
    let addr_text = std::fs::read_to_string(state.vm_dir("browser").join("api.addr")).unwrap();
    let addr = addr_text.trim();
    let screenshot = state.path().join("console.png");
    let user_data_dir = tempfile::tempdir().unwrap();

    let output = Command::new("node")
        .arg(web_dir.join("e2e/console.mjs"))
        .arg(format!("http://{addr}/?token={TOKEN}"))
        .arg(&screenshot)
        .arg(user_data_dir.path())
        .env("CHROMIUM", CHROMIUM)
        .current_dir(&web_dir)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|_| panic!("no JSON report from console.mjs:\n{stdout}\n{stderr}"));
    assert!(
        output.status.success(),
        "the browser run failed ({}): {report:#}\n{stderr}",
        output.status
    );

    assert_eq!(report["url_after_login"], format!("http://{addr}/"));
    assert_eq!(report["name"], "browser");
    assert_eq!(report["xterm"], monstervm::api::web::has_xterm());
    assert_eq!(report["hello_before_typing"], false);
    assert_eq!(report["resume_enabled_while_paused"], true);
    assert_eq!(
        report["steps"],
        serde_json::json!([
            "login",
            "running",
            "banner",
            "pause and resume",
            "echo",
            "screenshot",
            "stopped"
        ])
    );
    // xterm.js rows join without line breaks and the plain terminal keeps them, so the
    // check ignores whitespace.
    let terminal = report["terminal_text"].as_str().unwrap();
    let compact: String = terminal.split_whitespace().collect();
    assert!(
        compact.contains("Typetoecho,'q'topoweroff.hello"),
        "the echo is not after the banner: {terminal}"
    );
    assert!(
        report["metrics_text"]
            .as_str()
            .unwrap()
            .contains("port I/O"),
        "{report}"
    );
    let after_stop = report["state_after_stop"].as_str().unwrap();
    assert!(
        after_stop == "stopping" || after_stop == "stopped",
        "{after_stop}"
    );
    assert_eq!(report["final_state"], "stopped");
    assert_eq!(report["page_errors"], serde_json::json!([]));

    let png = std::fs::read(&screenshot).expect("the screenshot was written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        png.len() > 10_000,
        "a {}-byte screenshot is blank",
        png.len()
    );

    let status = reap(pid).expect("the VMM exits after Stop");
    assert!(libc::WIFEXITED(status), "wait status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), 0);
    assert_eq!(state.status("browser")["state"], "stopped");
}
