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
        .route_sync(100, handlers::echo)
        .route_sync(111, handlers::get_info)
        .route_sync(110, move |session: &Session, frame: Frame| {
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

/// Usage errors: exit code 2 and one line (clap adds a hint line to its
/// own), saying what is wrong once, and never a panic.
#[tokio::test]
async fn usage_errors_exit_2_with_one_line_that_says_it_once() {
    let server = start_server().await;
    let cases: [(&[&str], &str); 11] = [
        (&["send", "100", "--every", "0s"], "must be more than zero"),
        (&["send", "100", "--every", "abc"], "--every"),
        (&["send", "100", "--hex", "aé0"], "'é' is not a hex digit"),
        (&["send", "100", "--hex", "zz"], "'z' is not a hex digit"),
        (&["send", "100", "--hex", "abc"], "odd number of digits"),
        (
            &["send", "111", "--json", "{1: true}"],
            "--json: invalid JSON for wsproto.v1.InfoRequest: key must be a string",
        ),
        (
            &["send", "100", "--json", "{}"],
            "does not take a protobuf payload",
        ),
        (
            &["send", "100", "--file", "/nonexistent"],
            "--file: cannot read",
        ),
        (&["--token", "abc", "send", "100"], "--token is not a JWT"),
        (&["listen"], "nothing to listen to"),
        (
            &["--url", "http://127.0.0.1:1/ws", "send", "100"],
            "invalid URL",
        ),
    ];
    for (args, expected) in cases {
        // The helper passes --url itself.
        let (url, rest) = match args {
            ["--url", url, rest @ ..] => (url.to_string(), rest),
            _ => (server.url.clone(), args),
        };
        let output = client(&url, rest).await;
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {err}");
        let first = err.lines().next().unwrap_or_default();
        assert!(first.starts_with("error: "), "{args:?}: {err}");
        assert!(first.contains(expected), "{args:?}: {err}");
        let rest: Vec<&str> = err.lines().skip(1).filter(|l| !l.is_empty()).collect();
        assert!(
            rest.is_empty() || rest == ["For more information, try '--help'."],
            "{args:?}: {err}"
        );
        // The cause is not printed a second time after the message.
        let reason = first.rsplit(": ").next().unwrap_or_default();
        assert_eq!(first.matches(reason).count(), 1, "{args:?}: {err}");
    }
}

#[tokio::test]
async fn a_url_without_the_ws_path_is_explained_not_dumped() {
    let server = start_server().await;
    let root = server.url.trim_end_matches("/ws").to_owned();
    let output = client(&root, &["send", "100", "x"]).await;
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert_eq!(
        err,
        format!(
            "error: {root} answered with a web page (HTTP 200), not a WebSocket; \
             the opcode protocol is at {}\n",
            server.url
        )
    );
}

/// `/echo` sends back what it gets and never a WELCOME: said at once (the
/// client's own 60 s timeout would outlast the helper's 20 s bound).
#[tokio::test]
async fn the_echo_endpoint_is_recognised_instead_of_timing_out() {
    let server = start_server().await;
    let echo = server.url.replace("/ws", "/echo");
    for args in [
        vec!["--timeout", "60s", "send", "100", "x"],
        vec!["--timeout", "60s", "listen", "--subscribe", "alarm.#"],
    ] {
        let output = client(&echo, &args).await;
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(
            err,
            format!(
                "error: {echo} sent back what it was sent, and no WELCOME frame: it is an echo \
                 endpoint (such as /echo), not the opcode protocol, which is at {}\n",
                server.url
            ),
            "{args:?}"
        );
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

/// A critical push to `user` through the publish API.
async fn push_critical(url: &str, user: &str, data: &str) {
    let api = url
        .replace("ws://", "http://")
        .replace("/ws", "/api/publish");
    let body = format!(r#"{{"user": "{user}", "critical": true, "data": "{data}"}}"#);
    let (status, answer) = wsproto_client::http::post_json(&api, Some(API_KEY), &body)
        .await
        .unwrap();
    assert_eq!(status.as_u16(), 200, "{}", String::from_utf8_lossy(&answer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_as_a_device_resumes_the_users_critical_pushes_where_it_stopped() {
    let server = start_server().await;
    let listen = |count: &'static str| {
        tokio::process::Command::new(CLIENT)
            .args([
                "--url",
                &server.url,
                "listen",
                "--user",
                "ann",
                "--device",
                "phone",
                "--count",
                count,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut first = listen("1");
    // Its first line on stderr comes once the device's session is up.
    let mut report = tokio::io::BufReader::new(first.stderr.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncBufReadExt::read_line(&mut report, &mut line),
    )
    .await
    .expect("listener connected")
    .unwrap();
    push_critical(&server.url, "ann", "smoke in hall 3").await;
    let output = tokio::time::timeout(Duration::from_secs(10), first.wait_with_output())
        .await
        .expect("listener exits after --count")
        .unwrap();
    assert!(output.status.success(), "{line}");
    assert_eq!(stdout(&output), "direct seq=1 from=- \"smoke in hall 3\"\n");

    // Published while no listener runs: the next run of the same device
    // prints them first, and not the one it already printed.
    push_critical(&server.url, "ann", "hall 3 clear").await;
    push_critical(&server.url, "ann", "all clear").await;
    let output = tokio::time::timeout(Duration::from_secs(10), listen("2").wait_with_output())
        .await
        .expect("listener exits after --count")
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "direct seq=2 from=- \"hall 3 clear\"\ndirect seq=3 from=- \"all clear\"\n"
    );
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
        .stderr(Stdio::piped())
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
    assert_eq!(stderr(&output), "subscribed to alarm.#\n");

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

/// A server requiring HS256 tokens signed with `secret`; returns its /ws URL.
async fn start_server_with_jwt(secret: &str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = Config {
        jwt_secret: Some(secret.into()),
        ..Config::default()
    };
    let server = Server::from_listener(listener, config, handlers::builtin()).unwrap();
    let url = format!("ws://{}/ws", server.local_addr().unwrap());
    tokio::spawn(server.run(std::future::pending()));
    url
}

/// `wsproto-client token ARGS…`, the token it printed.
async fn mint(args: &[&str]) -> String {
    let output = client("ws://unused/ws", &[&["token"], args].concat()).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let token = stdout(&output);
    assert_eq!(token.lines().count(), 1, "{token}");
    token.trim().to_owned()
}

#[tokio::test]
async fn a_minted_token_is_accepted_and_its_permissions_hold() {
    let secret = "cli-test-secret";
    let url = start_server_with_jwt(secret).await;
    let token = mint(&[
        "--secret",
        secret,
        "--user",
        "alice",
        "--subscribe",
        "alarm.#",
        "--join",
        "lobby",
        "--ttl",
        "10m",
    ])
    .await;

    let output = client(&url, &["--token", &token, "send", "111"]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains(r#""user_id":"alice""#),
        "{}",
        stdout(&output)
    );

    let subscribe = |topic: &str| format!(r#"{{"topics": ["{topic}"]}}"#);
    let allowed = subscribe("alarm.fire");
    let output = client(
        &url,
        &[
            "--token",
            &token,
            "send",
            "10",
            "--json",
            &allowed,
            "--request-id",
        ],
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), "5 ACK len=0 id=1 (empty)\n");

    let forbidden = subscribe("rowdata.temp.42");
    let output = client(
        &url,
        &["--token", &token, "send", "10", "--json", &forbidden],
    )
    .await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).starts_with("error: server replied PERMISSION_DENIED (15) to opcode 10"),
        "{}",
        stderr(&output)
    );

    let output = client(
        &url,
        &[
            "--token", &token, "listen", "--join", "lobby", "--count", "0",
        ],
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    let output = client(&url, &["--token", &token, "listen", "--join", "kitchen"]).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("PERMISSION_DENIED"),
        "{}",
        stderr(&output)
    );

    // Signed with another secret, or none at all: refused at the upgrade, in words.
    let forged = mint(&["--secret", "another-secret", "--user", "alice"]).await;
    let output = client(&url, &["--token", &forged, "send", "100", "x"]).await;
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr(&output),
        "error: server refused the WebSocket upgrade: HTTP 401: invalid token signature\n"
    );
}

#[tokio::test]
async fn token_usage_errors_exit_2() {
    for (args, expected) in [
        (
            vec!["--secret", "s", "--user", "a", "--subscribe", "a..b"],
            "--subscribe \"a..b\"",
        ),
        (vec!["--secret", "", "--user", "a"], "--secret is empty"),
        (
            vec!["--secret", "s", "--user", "a", "--ttl", "0s"],
            "must be more than zero",
        ),
        (vec!["--secret", "s"], "--user <USER>"),
    ] {
        let output = client("ws://unused/ws", &[&["token"], &args[..]].concat()).await;
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(expected),
            "{args:?}: {err}"
        );
    }
}

/// Opcode 110 keeps friends per user: one CLI `send` adds, the next (a new
/// connection) sees it — by `--user` in insecure mode, or by token.
#[tokio::test]
async fn friends_belong_to_the_user_across_connections() {
    let server = start_server().await;
    let with_friends = r#"{"include_friends": true}"#;
    let info = |output: &Output| {
        assert!(output.status.success(), "{}", stderr(output));
        let out = stdout(output);
        let friends = out
            .split_once(r#""friends":"#)
            .map(|(_, rest)| rest.to_owned());
        friends.unwrap_or_else(|| panic!("no friends in {out}"))
    };

    let added = client(&server.url, &["--user", "carol", "send", "110", "dave"]).await;
    assert!(added.status.success(), "{}", stderr(&added));
    let carol = client(
        &server.url,
        &["--user", "carol", "send", "111", "--json", with_friends],
    )
    .await;
    assert!(
        info(&carol).starts_with(r#"["dave"]"#),
        "{}",
        stdout(&carol)
    );
    assert!(stdout(&carol).contains(r#""friend_count":1"#));
    // Someone else, and a session without a user, have lists of their own.
    let erin = client(
        &server.url,
        &["--user", "erin", "send", "111", "--json", with_friends],
    )
    .await;
    assert!(info(&erin).starts_with("[]"), "{}", stdout(&erin));
    let anonymous = client(&server.url, &["send", "111", "--json", with_friends]).await;
    assert!(info(&anonymous).starts_with("[]"), "{}", stdout(&anonymous));

    let secret = "friends-secret";
    let url = start_server_with_jwt(secret).await;
    let token = mint(&["--secret", secret, "--user", "frank"]).await;
    let added = client(&url, &["--token", &token, "send", "110", "grace"]).await;
    assert!(added.status.success(), "{}", stderr(&added));
    let frank = client(
        &url,
        &["--token", &token, "send", "111", "--json", with_friends],
    )
    .await;
    assert!(
        info(&frank).starts_with(r#"["grace"]"#),
        "{}",
        stdout(&frank)
    );
}

#[test]
fn help_groups_the_options() {
    /// A command line, and the flags expected under each heading.
    type Groups = (
        &'static [&'static str],
        &'static [(&'static str, &'static str)],
    );
    let groups: [Groups; 2] = [
        (
            &["send", "--help"],
            &[
                ("Payload", "--hex"),
                ("Repeat", "--every"),
                ("Output", "--verbose"),
                ("Connection", "--url"),
                ("Auth", "--token"),
            ],
        ),
        (
            &["bench", "fanout", "--help"],
            &[
                ("Workload", "--subs"),
                ("Servers", "--sub-url"),
                ("Measurement", "--server-pid"),
                ("Load generator", "--ramp"),
                ("Output", "--json"),
                ("Connection", "--url"),
            ],
        ),
    ];
    for (args, expected) in groups {
        let output = Command::new(CLIENT).args(args).output().unwrap();
        assert!(output.status.success());
        let help = String::from_utf8_lossy(&output.stdout);
        for (heading, flag) in expected {
            let start = help.find(&format!("\n{heading}:\n")).expect(heading);
            let section = help[start + 1..].split("\n\n").next().unwrap_or_default();
            assert!(
                section.contains(flag),
                "{flag} not under {heading}:\n{help}"
            );
        }
    }
}
