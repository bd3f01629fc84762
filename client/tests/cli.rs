//! `wsproto-client` end to end: the built binary against a real server.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::net::TcpListener;
use wsproto::{handlers, Config, Frame, Hub, Router, Server, Session};

const CLIENT: &str = env!("CARGO_BIN_EXE_wsproto-client");
const API_KEY: &str = "cli-test-key";

struct Running {
    url: String,
    hub: Hub,
    /// Every frame the server received, re-encoded exactly as it arrived.
    received: Arc<Mutex<Vec<bytes::Bytes>>>,
}

/// The built-in handlers, with opcode 110 also recording what it received.
async fn start_server() -> Running {
    let received = Arc::new(Mutex::new(Vec::new()));
    let record = received.clone();
    let router = Router::new()
        .route(100, handlers::echo)
        .route(111, handlers::get_info)
        .route(110, move |session: Session, frame: Frame| {
            record.lock().unwrap().push(frame.encode());
            handlers::add_friend(session, frame)
        });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = Config {
        api_key: Some(API_KEY.into()),
        ..Config::default()
    };
    let server = Server::from_listener(listener, config, router).unwrap();
    let url = format!("ws://{}/ws", server.local_addr().unwrap());
    let hub = server.hub();
    tokio::spawn(server.run(std::future::pending()));
    Running { url, hub, received }
}

async fn client(url: &str, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(CLIENT);
    command.arg("--url").arg(url).args(args);
    tokio::time::timeout(Duration::from_secs(20), command.output())
        .await
        .expect("client finished")
        .unwrap()
}

/// A TCP server that accepts connections and never says anything.
fn silent_server() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    addr
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn send_110_sends_one_plain_frame_and_prints_the_decoded_reply() {
    let server = start_server().await;
    let output = client(&server.url, &["send", "110", "我们都好"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "110 ADD_FRIEND len=16 FriendAdded {\"name\":\"我们都好\",\"friend_count\":1,\"already_friends\":false}\n"
    );
    let mut expected = vec![0, 0, 0, 110];
    expected.extend_from_slice("我们都好".as_bytes());
    assert_eq!(
        *server.received.lock().unwrap(),
        [bytes::Bytes::from(expected)]
    );
}

#[tokio::test]
async fn payloads_from_json_hex_and_file() {
    let server = start_server().await;
    let output = client(
        &server.url,
        &["send", "111", "--json", r#"{"include_friends": true}"#],
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    let out = stdout(&output);
    assert!(out.starts_with("111 GET_INFO len="), "{out}");
    assert!(out.contains("Info {\"server\":\"wsproto/"), "{out}");

    let output = client(
        &server.url,
        &["send", "echo", "--hex", "ff00", "--request-id"],
    )
    .await;
    assert_eq!(stdout(&output), "100 ECHO len=2 id=1 0xff00\n");

    let file = std::env::temp_dir().join(format!("wsproto-cli-{}.bin", std::process::id()));
    std::fs::write(&file, [1u8, 2, 3]).unwrap();
    let output = client(
        &server.url,
        &["send", "100", "--file", file.to_str().unwrap()],
    )
    .await;
    std::fs::remove_file(&file).unwrap();
    assert_eq!(stdout(&output), "100 ECHO len=3 0x010203\n");

    let output = client(&server.url, &["send", "100", "--json", "{}"]).await;
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("does not take a protobuf payload"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test]
async fn failures_are_one_clear_line_and_a_non_zero_exit() {
    let server = start_server().await;
    let cases = [
        (
            server.url.clone(),
            vec!["send", "999", "x"],
            "error: server replied UNKNOWN_OPCODE (10) to opcode 999",
        ),
        (
            server.url.clone(),
            vec!["send", "110", ""],
            "error: server replied BAD_PAYLOAD (11) to opcode 110",
        ),
        (
            server.url.replace("/ws", "/nope"),
            vec!["send", "100", "x"],
            "error: server refused the WebSocket upgrade: HTTP 404",
        ),
        (
            "ws://127.0.0.1:1/ws".to_owned(),
            vec!["send", "100", "x"],
            "error: cannot connect to ws://127.0.0.1:1/ws",
        ),
        (
            "http://127.0.0.1:1/ws".to_owned(),
            vec!["send", "100", "x"],
            "error: invalid URL",
        ),
        (
            format!("ws://{}/ws", silent_server()),
            vec!["--timeout", "300ms", "send", "100", "x"],
            "error: no answer from the server within 300ms",
        ),
    ];
    for (url, args, expected) in cases {
        let output = client(&url, &args).await;
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with(expected), "{args:?}: {err}");
    }
}

#[tokio::test]
async fn every_with_count_sends_on_a_timer_and_prints_every_reply() {
    let server = start_server().await;
    let started = Instant::now();
    let output = client(
        &server.url,
        &["send", "100", "tick", "--every", "100ms", "--count", "3"],
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), "100 ECHO len=4 \"tick\"\n".repeat(3));
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "sent on the timer"
    );
}

// Multi-threaded: this test blocks on the child process while the server
// it talks to runs on the same runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_closes_with_1000_and_exits_zero() {
    let server = start_server().await;
    let mut child = Command::new(CLIENT)
        .args([
            "--url",
            &server.url,
            "send",
            "100",
            "tick",
            "--every",
            "100ms",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..2 {
        assert_eq!(lines.next().unwrap().unwrap(), "100 ECHO len=4 \"tick\"");
    }
    assert_eq!(server.hub.len(), 1);
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let started = Instant::now();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // The server saw a clean close at once (not a heartbeat timeout).
    tokio::time::timeout(Duration::from_secs(2), async {
        while !server.hub.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("session closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_prints_what_publish_sends() {
    let server = start_server().await;
    let listener = tokio::process::Command::new(CLIENT)
        .args([
            "--url",
            &server.url,
            "listen",
            "--subscribe",
            "alarm.#",
            "--count",
            "2",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let alarms = "alarm.#".parse().unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while server.hub.subscriber_count(&alarms) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("listener subscribed");

    for text in ["smoke in hall 3", "all clear"] {
        let output = client(
            &server.url,
            &["publish", "alarm.fire", text, "--api-key", API_KEY],
        )
        .await;
        assert!(output.status.success(), "{}", stderr(&output));
        assert!(
            stdout(&output).starts_with("published to alarm.fire: seq="),
            "{}",
            stdout(&output)
        );
    }
    let output = tokio::time::timeout(Duration::from_secs(10), listener.wait_with_output())
        .await
        .expect("listener exits after --count")
        .unwrap();
    assert!(output.status.success());
    assert_eq!(
        stdout(&output),
        "topic=alarm.fire seq=1 from=- \"smoke in hall 3\"\ntopic=alarm.fire seq=2 from=- \"all clear\"\n"
    );

    let refused = client(
        &server.url,
        &["publish", "alarm.fire", "x", "--api-key", "wrong"],
    )
    .await;
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(
        stderr(&refused),
        "error: publish API answered HTTP 401: missing or invalid API key\n"
    );
}

#[tokio::test]
async fn wss_with_ca_file() {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let dir = std::env::temp_dir().join(format!("wsproto-cli-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let config = Config {
        tls_cert: Some(cert_path.clone()),
        tls_key: Some(key_path),
        ..Config::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Server::from_listener(listener, config, handlers::builtin()).unwrap();
    let url = format!("wss://{}/ws", server.local_addr().unwrap());
    tokio::spawn(server.run(std::future::pending()));

    let ca = cert_path.to_str().unwrap();
    let output = client(&url, &["--ca-file", ca, "send", "100", "secure"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), "100 ECHO len=6 \"secure\"\n");
    let refused = client(&url, &["send", "100", "secure"]).await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).starts_with("error:"),
        "{}",
        stderr(&refused)
    );
}
