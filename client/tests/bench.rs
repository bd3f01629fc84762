//! `wsproto-client bench`, smoke-tested against a real server: each mode
//! runs briefly with a handful of connections and must report sane numbers.
//! These are not performance tests; `benches/compare.sh` measures.

use std::{process::Output, time::Duration};

use serde_json::Value;
use tokio::net::TcpListener;
use wsproto::{handlers, Config, Hub, Server};

const CLIENT: &str = env!("CARGO_BIN_EXE_wsproto-client");
const API_KEY: &str = "bench-test-key";

/// A server as `benches/compare.sh` starts one: no rate limit, clients may
/// publish under `bench.`.
async fn start_server() -> (String, Hub) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = Config {
        rate_limit: 0.0,
        api_key: Some(API_KEY.into()),
        client_publish: vec!["bench.#".parse().unwrap()],
        history: vec![(
            "bench.recovery".parse().unwrap(),
            wsproto::broker::HistoryPolicy {
                max_len: 10_000,
                max_age: None,
            },
        )],
        ..Config::default()
    };
    let server = Server::from_listener(listener, config, handlers::builtin()).unwrap();
    let url = format!("ws://{}/ws", server.local_addr().unwrap());
    let hub = server.hub();
    tokio::spawn(server.run(std::future::pending()));
    (url, hub)
}

async fn bench(url: &str, args: &[&str]) -> (Output, Value) {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(CLIENT)
            .arg("--url")
            .arg(url)
            .arg("bench")
            .args(args)
            .arg("--json")
            .output(),
    )
    .await
    .expect("bench finished")
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let report = serde_json::from_str(stdout.trim()).unwrap_or_else(|err| {
        panic!(
            "one JSON line expected ({err}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output, report)
}

fn number(report: &Value, key: &str) -> f64 {
    report[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} in {report}"))
}

#[tokio::test]
async fn echo_reports_round_trips_and_latency_percentiles() {
    let (url, hub) = start_server().await;
    // The server runs in this process.
    let pid = std::process::id().to_string();
    let args = [
        "echo",
        "--server-pid",
        &pid,
        "--conns",
        "4",
        "--depth",
        "8",
        "--size",
        "64",
        "--duration",
        "1s",
    ];
    let (output, report) = bench(&url, &args).await;
    assert!(output.status.success(), "{report}");
    assert_eq!(report["mode"], "echo");
    assert_eq!(report["connected"], 4);
    assert_eq!(report["errors"], 0);
    assert!(number(&report, "ops") > 100.0, "{report}");
    let (p50, p99, p999) = (
        number(&report, "p50_us"),
        number(&report, "p99_us"),
        number(&report, "p999_us"),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= p999, "{report}");
    // CPU time is counted in 10 ms ticks; a second of round trips uses more.
    assert!(number(&report, "client_cpu_s") > 0.0, "{report}");
    assert!(number(&report, "server_cpu_us_per_op") > 0.0, "{report}");
    assert!(number(&report, "server_cpu_share") > 0.0, "{report}");
    wait_for_no_sessions(&hub).await;
}

#[tokio::test]
async fn an_opcode_without_a_handler_counts_as_errors() {
    let (url, _hub) = start_server().await;
    let args = ["echo", "--opcode", "4242", "--duration", "500ms"];
    let (output, report) = bench(&url, &args).await;
    assert!(!output.status.success(), "errors give a non-zero exit");
    assert!(number(&report, "errors") > 0.0, "{report}");
    assert_eq!(report["ops"], 0);
}

#[tokio::test]
async fn fanout_delivers_every_message_to_every_subscriber() {
    let (url, hub) = start_server().await;
    for via in [
        &["--via", "ws"][..],
        &["--via", "http", "--api-key", API_KEY][..],
    ] {
        let mut args = vec!["fanout", "--subs", "5", "--size", "64", "--duration", "1s"];
        args.extend_from_slice(via);
        let (output, report) = bench(&url, &args).await;
        assert!(output.status.success(), "{via:?}: {report}");
        let published = number(&report, "published");
        assert!(published > 10.0, "{report}");
        assert_eq!(number(&report, "expected"), published * 5.0);
        assert_eq!(report["received"], report["expected"], "{report}");
        assert_eq!(report["lost"], 0);
        assert!(number(&report, "deliveries_per_s") > 0.0);
        assert!(number(&report, "p99_us") > 0.0);
        wait_for_no_sessions(&hub).await;
    }

    // At a fixed rate: about rate × duration messages.
    let args = ["fanout", "--subs", "3", "--rate", "50", "--duration", "1s"];
    let (output, report) = bench(&url, &args).await;
    assert!(output.status.success(), "{report}");
    let published = number(&report, "published");
    assert!((40.0..=60.0).contains(&published), "{report}");
    assert_eq!(report["rate"], 50.0);
    assert_eq!(report["lost"], 0);
}

/// What `bench fanout` reports for the subscribers of one --sub-url.
fn group(report: &Value, index: usize) -> &Value {
    &report["by_url"][index]
}

/// Subscribers spread round robin over two URLs and a publisher on a third,
/// the shape of a cluster measurement. Today's server is one node, so the
/// two URLs name the same server (by `127.0.0.1` and by `localhost`): this
/// proves the spreading, the separate publisher and the per-URL counts, not
/// delivery across nodes (the next test shows what a node that receives
/// nothing looks like).
#[tokio::test]
async fn fanout_spreads_subscribers_over_urls_and_publishes_on_another() {
    let (url, hub) = start_server().await;
    let port = url
        .trim_start_matches("ws://127.0.0.1:")
        .trim_end_matches("/ws");
    let sub_urls = format!("ws://127.0.0.1:{port}/ws,ws://localhost:{port}/ws");
    for pub_url in [
        format!("ws://localhost:{port}/ws"),
        format!("http://127.0.0.1:{port}/api/publish"),
    ] {
        let args = [
            "fanout",
            "--subs",
            "6",
            "--duration",
            "1s",
            "--sub-url",
            &sub_urls,
            "--pub-url",
            &pub_url,
            "--api-key",
            API_KEY,
        ];
        let (output, report) = bench(&url, &args).await;
        assert!(output.status.success(), "{pub_url}: {report}");
        assert_eq!(report["pub_url"], pub_url.as_str());
        let published = number(&report, "published");
        assert!(published > 10.0, "{report}");
        assert_eq!(report["lost"], 0, "{report}");
        for (index, sub_url) in sub_urls.split(',').enumerate() {
            let group = group(&report, index);
            assert_eq!(group["url"], sub_url, "{report}");
            assert_eq!(group["subs"], 3, "{report}");
            assert_eq!(number(group, "received"), published * 3.0, "{report}");
            assert_eq!(group["lost"], 0, "{report}");
        }
        wait_for_no_sessions(&hub).await;
    }
}

/// Two separate servers, publishing on the first: with today's single-node
/// memory broker the second one's subscribers receive nothing, and the run
/// must say so (per URL, and as a failure) rather than report a rate.
#[tokio::test]
async fn fanout_reports_subscribers_of_another_server_that_received_nothing() {
    let (first, _first_hub) = start_server().await;
    let (second, _second_hub) = start_server().await;
    let sub_urls = format!("{first},{second}");
    let args = [
        "fanout",
        "--subs",
        "4",
        "--rate",
        "50",
        "--duration",
        "1s",
        "--sub-url",
        &sub_urls,
        "--pub-url",
        &first,
    ];
    let (output, report) = bench(&first, &args).await;
    assert!(
        !output.status.success(),
        "lost messages fail the run: {report}"
    );
    let published = number(&report, "published");
    assert!(published > 10.0, "{report}");
    let (reached, unreached) = (group(&report, 0), group(&report, 1));
    assert_eq!(reached["url"], first.as_str());
    assert_eq!(number(reached, "received"), published * 2.0, "{report}");
    assert_eq!(reached["lost"], 0, "{report}");
    assert_eq!(unreached["url"], second.as_str());
    assert_eq!(unreached["received"], 0, "{report}");
    assert_eq!(number(unreached, "lost"), published * 2.0, "{report}");
    assert_eq!(report["lost"], unreached["lost"], "{report}");
    assert_eq!(report["errors"], 0, "{report}");
}

#[tokio::test]
async fn connections_are_held_and_measured_against_the_servers_memory() {
    let (url, hub) = start_server().await;
    let pid = std::process::id().to_string();
    let args = [
        "connections",
        "--conns",
        "50",
        "--hold",
        "300ms",
        "--server-pid",
        &pid,
    ];
    let (output, report) = bench(&url, &args).await;
    assert!(output.status.success(), "{report}");
    assert_eq!(report["held"], 50);
    assert_eq!(report["failed"], 0);
    assert!(number(&report, "fd_limit") >= 50.0);
    assert!(number(&report, "rss_after_bytes") > 0.0);
    assert!(report["bytes_per_conn"].is_number(), "{report}");
    wait_for_no_sessions(&hub).await;
}

#[tokio::test]
async fn a_server_that_is_not_there_is_a_clear_error() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let output = tokio::process::Command::new(CLIENT)
        .args([
            "--url",
            &format!("ws://127.0.0.1:{port}/ws"),
            "bench",
            "echo",
        ])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no connection opened"), "{stderr}");
}

#[tokio::test]
async fn recovery_checks_every_device_across_its_reconnects() {
    let (url, hub) = start_server().await;
    let (output, report) = bench(
        &url,
        &[
            "recovery",
            "--devices",
            "20",
            "--rate",
            "100",
            "--duration",
            "2s",
            "--drop-every",
            "500ms",
            "--api-key",
            API_KEY,
        ],
    )
    .await;
    assert!(output.status.success(), "{report}");
    assert_eq!(report["mode"], "recovery");
    let published = report["published"].as_u64().unwrap();
    assert!(published > 100, "{report}");
    assert_eq!(
        report["delivered"].as_u64(),
        Some(20 * published),
        "{report}"
    );
    for zero in [
        "duplicated",
        "reordered",
        "announced",
        "silently_missing",
        "errors",
    ] {
        assert_eq!(report[zero], 0, "{zero}: {report}");
    }
    assert!(report["reconnects"].as_u64().unwrap() >= 20, "{report}");
    assert!(number(&report, "recovery_max_ms") > 0.0, "{report}");
    wait_for_no_sessions(&hub).await;
}

async fn wait_for_no_sessions(hub: &Hub) {
    for _ in 0..200 {
        if hub.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{} sessions left after the bench", hub.len());
}
