//! The browser client in a real browser: `web/test/demo.mjs` drives two
//! headless Chromium pages through Playwright against a server started
//! here — they chat, and a value published through the HTTP API appears on
//! the chart. `web/test/*.test.mjs` checks the JS codec against the golden
//! frames.
//!
//! Needs node, `npm ci` in `web/`, and Chromium (`.ci/run` installs them).
//! Without them the tests are skipped with a message, except under CI
//! (`CI` set), where a missing tool is a failure.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use common::{config, TestServer, API_KEY};

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("web")
}

/// Whether the tools are there; panics under CI when they are not.
fn tools_available(need_browser: bool) -> bool {
    let node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let playwright = web_dir().join("node_modules/playwright-core").is_dir();
    let chromium =
        Path::new(&std::env::var("CHROMIUM_PATH").unwrap_or("/usr/bin/chromium".into())).exists();
    let missing: Vec<&str> = [
        (!node).then_some("node"),
        (need_browser && !playwright).then_some("web/node_modules (run `npm ci` in web/)"),
        (need_browser && !chromium).then_some("chromium (apt-get install chromium)"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if missing.is_empty() {
        return true;
    }
    let message = format!("browser test needs: {}", missing.join(", "));
    assert!(std::env::var_os("CI").is_none(), "{message}");
    eprintln!("SKIPPED: {message}");
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browser_pages_chat_and_a_published_value_reaches_the_chart() {
    if !tools_available(true) {
        return;
    }
    let server = TestServer::start(config()).await;
    let base = format!("http://{}", server.addr);
    let output = tokio::process::Command::new("node")
        .arg(web_dir().join("test/demo.mjs"))
        .args([&base, API_KEY])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "demo.mjs failed\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("PASS: demo page end to end"), "{stdout}");
    server.wait_for_sessions(0).await;
}

#[test]
fn the_js_client_agrees_with_the_golden_frames() {
    if !tools_available(false) {
        return;
    }
    let output = Command::new("node")
        .args(["--test", "test/"])
        .current_dir(web_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("# fail 0"), "{stdout}");
}

#[tokio::test]
async fn the_server_serves_the_demo_page_and_the_client_module() {
    let server = TestServer::start(config()).await;
    for (path, content_type, needle) in [
        ("/?user=alice", "text/html", "<canvas id=\"chart\""),
        (
            "/wsproto.js",
            "text/javascript",
            "export class WsprotoClient",
        ),
        ("/demo.js", "text/javascript", "demo.value"),
    ] {
        let response = common::http_get(server.addr, path).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{path}: {response}");
        assert!(
            response.contains(&format!("content-type: {content_type}")),
            "{path}"
        );
        assert!(response.contains(needle), "{path}");
    }
}
