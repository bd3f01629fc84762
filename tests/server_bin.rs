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
    // IPv6 loopback too (`localhost` may resolve to ::1 first), where the
    // machine has it.
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        let mut v6 = Client::connect(&format!("ws://[::1]:{port}/ws"))
            .await
            .expect("insecure mode serves ::1 too");
        v6.welcome().await.unwrap();
    } else {
        eprintln!("no IPv6 loopback on this machine; ::1 not checked");
    }

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
            "--worker-threads",
            "1",
        ],
        &[
            ("WSPROTO_PING_INTERVAL", "7s"),
            ("WSPROTO_SHUTDOWN_TIMEOUT", "1s"),
            // tokio's own scheduling, for once.
            ("WSPROTO_GLOBAL_QUEUE_INTERVAL", "0"),
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
    assert_eq!(output.status.code(), Some(2), "a setting to change");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("error: --listen: ")
            && stderr.contains("not a loopback address")
            && stderr.contains("--insecure-allow-remote"),
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
        (vec!["--worker-threads", "0"], "--worker-threads"),
    ] {
        let output = Command::new(SERVER).args(&args).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// Runs the binary with `args` (on a free loopback port, with
/// `RUST_BACKTRACE=1`) and returns its exit code and stderr.
fn failed_start(args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(SERVER)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code(), stderr)
}

#[test]
fn a_configuration_error_is_one_line_naming_the_flag_and_exit_code_2() {
    let dir = std::env::temp_dir().join(format!("wsproto-config-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_a_key = dir.join("not-a-key.pem");
    std::fs::write(&not_a_key, "hello").unwrap();
    let missing = dir.join("missing.pem");
    let (missing, not_a_key) = (missing.to_str().unwrap(), not_a_key.to_str().unwrap());
    for (args, expected) in [
        (
            vec!["--jwt-secret", ""],
            "error: --jwt-secret: is empty, so anyone could sign tokens",
        ),
        (
            vec!["--jwt-secret", "s", "--jwt-public-key", not_a_key],
            "error: --jwt-secret: cannot be combined with --jwt-public-key",
        ),
        (
            vec!["--jwt-public-key", missing],
            "error: --jwt-public-key: cannot read",
        ),
        (
            vec!["--jwt-public-key", not_a_key],
            "error: --jwt-public-key: ",
        ),
        (
            vec!["--tls-cert", missing, "--tls-key", missing],
            "error: --tls-cert: cannot read certificates from",
        ),
        (
            vec!["--log", "wsproto=loud"],
            "error: invalid value 'wsproto=loud' for '--log <LOG>'",
        ),
    ] {
        let (code, stderr) = failed_start(&args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with(expected), "{args:?}: {stderr}");
        let lines = stderr.lines().filter(|l| !l.trim().is_empty()).count();
        // clap adds a "For more information, try '--help'." line.
        assert!(lines <= 2, "{args:?}: {stderr}");
        assert!(!stderr.contains("cannot listen"), "{args:?}: {stderr}");
        assert!(!stderr.contains("backtrace"), "{args:?}: {stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_busy_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = Command::new(SERVER)
        .args(["--listen", &addr])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "a runtime failure");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with(&format!("error: cannot listen on {addr}: ")),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "no backtrace: {stderr}");
}

#[test]
fn the_start_up_log_says_where_the_demo_page_and_the_websocket_are() {
    let mut child = Command::new(SERVER)
        .args(["--listen", "127.0.0.1:0"])
        .env("WSPROTO_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut port = None;
    let mut urls = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some((_, addr)) = line.split_once("addr=") {
            port = Some(addr.trim().parse::<SocketAddr>().unwrap().port());
        }
        if line.contains("demo page") {
            urls = Some(line);
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    signal(&child, "-TERM");
    assert!(child.wait().unwrap().success());
    let (port, urls) = (port.expect("address logged"), urls.expect("URLs logged"));
    assert!(
        urls.contains(&format!("http://127.0.0.1:{port}/ "))
            && urls.contains(&format!("ws://127.0.0.1:{port}/ws")),
        "{urls}"
    );
}

/// The section of `help` under `heading`, up to the next heading.
fn help_section<'a>(help: &'a str, heading: &str) -> &'a str {
    let start = help
        .find(&format!("\n{heading}:\n"))
        .unwrap_or_else(|| panic!("no {heading} heading in\n{help}"));
    let rest = &help[start + heading.len() + 3..];
    let end = rest.find("\n\n").unwrap_or(rest.len());
    &rest[..end]
}

#[test]
fn help_groups_the_options() {
    let output = Command::new(SERVER).arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for (heading, flags) in [
        (
            "Connection",
            &["--listen", "--ws-path", "--ping-interval"][..],
        ),
        (
            "Limits",
            &["--max-message-size", "--max-connections", "--rate-limit"],
        ),
        ("Auth", &["--jwt-secret", "--api-key"]),
        ("TLS", &["--tls-cert", "--tls-key"]),
        ("Hub", &["--topic-policy", "--client-publish"]),
        ("Logging", &["--log"]),
        ("Runtime", &["--worker-threads", "--global-queue-interval"]),
    ] {
        let section = help_section(&help, heading);
        for flag in flags {
            assert!(
                section.contains(flag),
                "{flag} not under {heading}:\n{help}"
            );
        }
    }
}
