//! The browser client in a real browser: `web/test/demo.mjs` drives two
//! headless Chromium pages through Playwright against a server started
//! here — they chat, and a value published through the HTTP API appears on
//! the chart. `web/test/*.test.mjs` checks the JS codec against the golden
//! frames.
//!
//! Needs node, `npm ci` in `web/`, and Chromium (`.ci/run` installs them).
//! On a machine without them `build.rs` marks these tests `ignored`, with
//! the command that installs what is missing, so `cargo test` reports them
//! as ignored rather than passed; under CI (`CI` set), or when run with
//! `--ignored`, a missing tool fails the test with that command instead.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use common::{config, external, TestServer, API_KEY};

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("web")
}

/// What the page test needs: node, Chromium (`CHROMIUM_PATH` or on
/// `PATH`) and playwright-core in `web/node_modules`; returns the paths of
/// node and Chromium.
///
/// # Panics
/// When one is missing, naming the command that installs it.
fn require_browser() -> (PathBuf, PathBuf) {
    let node = external::require("node");
    let chromium = match std::env::var_os("CHROMIUM_PATH") {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "CHROMIUM_PATH={} does not exist; unset it, or: apt-get install -y chromium",
                path.display()
            );
            path
        }
        None => external::require("chromium"),
    };
    assert!(
        web_dir().join("node_modules/playwright-core").is_dir(),
        "web/node_modules/playwright-core is missing; this test needs it: (cd web && npm ci)"
    );
    (node, chromium)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    missing_browser,
    ignore = "needs chromium and web/node_modules: apt-get install -y chromium && (cd web && npm ci)"
)]
async fn two_browser_pages_chat_and_a_published_value_reaches_the_chart() {
    let (node, chromium) = require_browser();
    let server = TestServer::start(config()).await;
    let base = format!("http://{}", server.addr);
    let output = tokio::process::Command::new(node)
        .arg(web_dir().join("test/demo.mjs"))
        .args([&base, API_KEY])
        .env("CHROMIUM_PATH", chromium)
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
#[cfg_attr(missing_node, ignore = "needs node: apt-get install -y nodejs npm")]
fn the_js_client_agrees_with_the_golden_frames() {
    let node = external::require("node");
    let output = Command::new(node)
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
