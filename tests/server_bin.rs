//! `wsproto-server` end to end: the built binary, its flags and signals.

mod common;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use wsproto::{opcode, proto::v1};
use wsproto_client::{Client, ClientError};

const SERVER: &str = env!("CARGO_BIN_EXE_wsproto-server");

/// Starts the binary with `args` and `env` and returns it with the port it
/// listens on.
fn spawn_server(args: &[&str], env: &[(&str, &str)]) -> (Child, u16) {
    let (child, addr) = spawn_server_at(args, env);
    (child, addr.port())
}

/// Starts the binary and returns it with the address it says it listens on.
fn spawn_server_at(args: &[&str], env: &[(&str, &str)]) -> (Child, SocketAddr) {
    let mut child = Command::new(SERVER)
        .args(args)
        .env("WSPROTO_LOG", "info")
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("server printed its address").unwrap();
        if let Some((_, addr)) = line.split_once("addr=") {
            break addr.trim().parse().unwrap();
        }
    };
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (child, addr)
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([name, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn go_style_listen_address_serves_loopback_in_insecure_mode() {
    let (mut child, addr) = spawn_server_at(&["--listen", ":0", "--shutdown-timeout", "1s"], &[]);
    assert_eq!(
        addr.ip().to_string(),
        "127.0.0.1",
        "insecure mode stays on loopback"
    );
    let port = addr.port();
    let mut client = Client::connect(&format!("ws://127.0.0.1:{port}/ws"))
        .await
        .unwrap();
    client.welcome().await.unwrap();
    let reply = client.call(opcode::ADD_FRIEND, "我们都好").await.unwrap();
    assert_eq!(reply.opcode, opcode::ADD_FRIEND);
    let added: v1::FriendAdded = prost::Message::decode(reply.payload).unwrap();
    assert_eq!(added.name, "我们都好");

    signal(&child, "-TERM");
    match client.recv_timeout(Duration::from_secs(5)).await {
        Err(ClientError::Closed { code, .. }) => assert_eq!(code, 1001),
        other => panic!("expected close 1001, got {other:?}"),
    }
    assert!(
        child.wait().unwrap().success(),
        "exit 0 after graceful shutdown"
    );
}

#[tokio::test]
async fn flags_and_env_configure_the_server() {
    let (mut child, port) = spawn_server(
        &[
            "--listen",
            "127.0.0.1:0",
            "--ws-path",
            "/proto",
            "--max-message-size",
            "100",
        ],
        &[
            ("WSPROTO_PING_INTERVAL", "7s"),
            ("WSPROTO_SHUTDOWN_TIMEOUT", "1s"),
        ],
    );
    let url = format!("ws://127.0.0.1:{port}/proto");
    let mut client = Client::connect(&url).await.unwrap();
    let welcome = client.welcome().await.unwrap();
    assert_eq!(
        (welcome.max_message_size, welcome.ping_interval_ms),
        (100, 7000)
    );
    signal(&child, "-INT");
    assert!(child.wait().unwrap().success());
}

#[test]
fn insecure_mode_needs_an_acknowledgement_to_listen_beyond_loopback() {
    let output = Command::new(SERVER)
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not a loopback address") && stderr.contains("--insecure-allow-remote"),
        "{stderr}"
    );

    for args in [
        vec!["--listen", ":0", "--insecure-allow-remote"],
        vec!["--listen", "0.0.0.0:0", "--insecure-allow-remote"],
        vec!["--listen", ":0", "--jwt-secret", "s3cret"],
    ] {
        let (mut child, addr) = spawn_server_at(&args, &[]);
        assert!(addr.ip().is_unspecified(), "{args:?} listens on {addr}");
        signal(&child, "-TERM");
        assert!(child.wait().unwrap().success());
    }
}

#[test]
fn bad_flags_exit_non_zero_with_a_reason() {
    for (args, needle) in [
        (vec!["--listen", "8080"], "invalid listen address"),
        (vec!["--ws-path", "ws"], "must start with '/'"),
        (vec!["--ping-interval", "soon"], "--ping-interval"),
        (vec!["--ping-interval", "0s"], "must be more than zero"),
    ] {
        let output = Command::new(SERVER).args(&args).output().unwrap();
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn a_busy_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = Command::new(SERVER)
        .args(["--listen", &addr])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
}
