//! The edge of the server as an operator deploys it: hostile or odd
//! input at the upgrade (tokens, connect URLs, request heads), admission
//! under load and at shutdown. Every refusal is an HTTP answer or a close
//! frame a client can act on, never a panic or a silent drop.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{config, raw_handshake, TestServer};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use wsproto::{opcode, proto::v1, Config, ErrorCode};
use wsproto_client::{Client, ClientError};

const SECRET: &str = "edge-secret";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(sub: &str, exp: u64) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": sub, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn start_with_auth() -> TestServer {
    TestServer::start(Config {
        jwt_secret: Some(SECRET.into()),
        ..config()
    })
    .await
}

/// Expiries no clock can represent: from 2^63 seconds up.
const FAR_EXPIRIES: [u64; 3] = [1 << 63, (1 << 63) + 1, u64::MAX];

#[tokio::test]
async fn a_token_expiring_past_what_a_clock_can_hold_gets_401_not_a_panic() {
    let server = start_with_auth().await;
    for exp in FAR_EXPIRIES {
        let path = format!("/ws?token={}", token("alice", exp));
        let (status, _) = raw_handshake(server.addr, &path, &[], None).await;
        assert_eq!(status, 401, "exp {exp}");
    }
    // A far but representable expiry is fine.
    let path = format!("/ws?token={}", token("alice", now() + 100 * 365 * 86_400));
    assert_eq!(raw_handshake(server.addr, &path, &[], None).await.0, 101);
}

#[tokio::test]
async fn refreshing_with_such_a_token_is_invalid_token_and_the_session_goes_on() {
    let server = start_with_auth().await;
    let url = format!("{}?token={}", server.url(), token("alice", now() + 600));
    let mut client = Client::connect(&url).await.unwrap();
    client.welcome().await.unwrap();
    for exp in FAR_EXPIRIES {
        let refresh = v1::RefreshToken {
            token: token("alice", exp),
        };
        match client
            .request::<v1::TokenRefreshed>(opcode::REFRESH_TOKEN, &refresh)
            .await
        {
            Err(ClientError::ErrorFrame { code, .. }) => {
                assert_eq!(code, ErrorCode::InvalidToken.as_u32(), "exp {exp}")
            }
            other => panic!("exp {exp}: expected INVALID_TOKEN, got {other:?}"),
        }
    }
    let reply = client.call(opcode::ECHO, "still here").await.unwrap();
    assert_eq!(reply.payload, "still here");
}

#[tokio::test]
async fn a_user_id_that_is_not_utf8_gets_400_instead_of_colliding() {
    let server = TestServer::start(config()).await;
    for query in [
        "user=%ff",
        "user=%fe",
        "user=a%c3",
        "user=%ed%a0%80",
        "subscribe=news%ff",
    ] {
        let (status, _) = raw_handshake(server.addr, &format!("/ws?{query}"), &[], None).await;
        assert_eq!(status, 400, "{query}");
    }
    // Valid percent-encoded UTF-8 (é) and '+' for a space in another key are fine.
    let url = format!("{}?user=ren%C3%A9&x=a+b", server.url());
    let mut client = Client::connect(&url).await.unwrap();
    assert_eq!(client.welcome().await.unwrap().user_id, "rené");
}

/// Sends `head` as is and reads the response's status line.
async fn status_of_raw_request(addr: std::net::SocketAddr, head: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before it has read everything.
    let _ = tcp.write_all(head).await;
    let mut response = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 1024];
        while !response.windows(2).any(|w| w == b"\r\n") {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => response.extend_from_slice(&buf[..n]),
            }
        }
    });
    read.await.expect("an answer in time");
    let response = String::from_utf8_lossy(&response);
    response.lines().next().unwrap_or_default().to_owned()
}

fn upgrade_head(extra_header_bytes: usize) -> Vec<u8> {
    format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         X-Padding: {}\r\n\r\n",
        "a".repeat(extra_header_bytes)
    )
    .into_bytes()
}

#[tokio::test]
async fn a_request_head_over_16_kib_gets_431() {
    let server = TestServer::start(config()).await;
    for size in [20 * 1024, 200 * 1024] {
        let status = status_of_raw_request(server.addr, &upgrade_head(size)).await;
        assert!(status.starts_with("HTTP/1.1 431"), "{size}: {status}");
    }
    // Many headers adding up past the cap too.
    let mut many = b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..90 {
        many.extend_from_slice(format!("X-H{i}: {}\r\n", "b".repeat(250)).as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let status = status_of_raw_request(server.addr, &many).await;
    assert!(status.starts_with("HTTP/1.1 431"), "{status}");
    // A large but ordinary head (a long JWT cookie, say) still upgrades.
    let status = status_of_raw_request(server.addr, &upgrade_head(12 * 1024)).await;
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
}

/// Reads a whole response from a connection the server closes; panics on
/// a reset (which could have destroyed it) or after 10 s.
async fn read_response(tcp: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut response = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut response));
    read.await
        .expect("the server closed the connection in time")
        .expect("closed cleanly, not reset");
    String::from_utf8_lossy(&response).to_lowercase()
}

#[tokio::test]
async fn idle_keep_alive_connections_do_not_hold_upgrade_slots() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start(Config {
        max_handshakes_per_ip: 2,
        ..config()
    })
    .await;
    // A metrics scraper or a proxy's pool: HTTP/1.1 requests, sockets kept.
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut head = vec![0u8; 256];
        let n = tcp.read(&mut head).await.unwrap();
        let head = String::from_utf8_lossy(&head[..n]).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        idle.push(tcp);
    }
    // The server closed them, so their slots are free for upgrades.
    for tcp in &mut idle {
        read_response(tcp).await;
    }
    for _ in 0..2 {
        let (status, _) = raw_handshake(server.addr, "/ws", &[], None).await;
        assert_eq!(status, 101);
    }
    // A backend publishing with the API key keeps its connection: many
    // publishes, one TCP connection.
    let mut backend = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let body = r#"{"topic":"news","data":"hi"}"#;
    let publish = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        common::API_KEY,
        body.len()
    );
    for _ in 0..3 {
        backend.write_all(publish.as_bytes()).await.unwrap();
        // Head and JSON body: read until the body's closing brace.
        let mut response = Vec::new();
        while !response.ends_with(b"}") {
            let mut buf = [0u8; 512];
            let n = backend.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&response));
            response.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&response).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
    }
}

#[tokio::test]
async fn upgrades_refused_for_capacity_say_when_to_retry() {
    let server = TestServer::start(Config {
        max_connections: 1,
        max_connections_per_ip: 1,
        ..config()
    })
    .await;
    let _first = server.client().await;
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    use tokio::io::AsyncWriteExt;
    let request = String::from_utf8(upgrade_head(0)).unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let response = read_response(&mut tcp).await;
    assert!(response.starts_with("http/1.1 429"), "{response}");
    assert!(response.contains("\r\nretry-after: 5\r\n"), "{response}");

    let server = TestServer::start(Config {
        max_connections: 1,
        ..config()
    })
    .await;
    let _first = server.client().await;
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let response = read_response(&mut tcp).await;
    assert!(response.starts_with("http/1.1 503"), "{response}");
    assert!(response.contains("\r\nretry-after: 5\r\n"), "{response}");
}

#[tokio::test]
async fn the_listen_backlog_is_configurable_and_defaults_to_4096() {
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .map_or(4096, |s| s.trim().parse().unwrap_or(4096));
    for (backlog, expected) in [(None, 4096.min(somaxconn)), (Some(100), 100)] {
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Config::default()
        };
        if let Some(backlog) = backlog {
            config.listen_backlog = backlog;
        }
        let server = wsproto::Server::bind(config, wsproto::handlers::builtin())
            .await
            .unwrap();
        let port = server.local_addr().unwrap().port();
        // For a listening socket, ss reports the backlog as Send-Q.
        let ss = std::process::Command::new("ss")
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()
            .expect("this test reads the backlog with ss: apt-get install -y iproute2");
        let out = String::from_utf8_lossy(&ss.stdout);
        let send_q: u32 = out
            .split_whitespace()
            .nth(2)
            .and_then(|q| q.parse().ok())
            .unwrap_or_else(|| panic!("no listener in {out:?}"));
        assert_eq!(send_q, expected, "{out}");
    }
}

#[tokio::test]
async fn during_shutdown_new_connections_get_503_with_retry_after() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start(config()).await;
    // A client that never answers the server's close keeps the drain going.
    let _stubborn = common::raw_websocket(server.addr, "/ws").await;
    server.wait_for_sessions(1).await;
    let addr = server.addr;
    let stopping = tokio::spawn(server.shutdown());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("still accepting while draining");
    let request = String::from_utf8(upgrade_head(0)).unwrap();
    let _ = tcp.write_all(request.as_bytes()).await;
    let response = read_response(&mut tcp).await;
    assert!(response.starts_with("http/1.1 503"), "{response}");
    assert!(response.contains("\r\nretry-after: 5\r\n"), "{response}");
    stopping.await.unwrap().unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed once the drain is over"
    );
}

async fn remote_addr_seen(
    server: &TestServer,
    source: &str,
    headers: &[(&str, &str)],
    preamble: &[u8],
) -> Result<String, u16> {
    common::remote_addr_seen(server.addr, source, headers, preamble).await
}

fn host(addr: &str) -> String {
    addr.parse::<std::net::SocketAddr>()
        .map_or(addr.to_owned(), |a| a.ip().to_string())
}

#[tokio::test]
async fn a_trusted_proxy_names_the_client_and_limits_count_per_real_client() {
    let server = TestServer::start(Config {
        trusted_proxies: vec!["127.0.0.1".parse().unwrap()],
        max_connections_per_ip: 1,
        ..config()
    })
    .await;
    let xff = |value: &'static str| [("X-Forwarded-For", value)];
    // Through the proxy (127.0.0.1): the right-most untrusted hop.
    let seen = remote_addr_seen(&server, "127.0.0.1", &xff("1.1.1.1, 203.0.113.7"), b"").await;
    assert_eq!(seen.map(|a| host(&a)), Ok("203.0.113.7".to_owned()));
    let seen = remote_addr_seen(
        &server,
        "127.0.0.1",
        &[("Forwarded", "for=\"[2001:db8::5]:4711\";proto=https")],
        b"",
    )
    .await;
    assert_eq!(seen, Ok("[2001:db8::5]:4711".to_owned()));
    let seen = remote_addr_seen(&server, "127.0.0.1", &[("X-Real-IP", "198.51.100.4")], b"").await;
    assert_eq!(seen.map(|a| host(&a)), Ok("198.51.100.4".to_owned()));
    // One session per client address: other clients of the same proxy are
    // not affected, a second from one client is.
    let mut held = Vec::new();
    for client in ["203.0.113.10", "203.0.113.11", "203.0.113.12"] {
        let url = server.url();
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
                .unwrap();
        request
            .headers_mut()
            .insert("x-forwarded-for", client.parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        held.push(ws);
    }
    let again = remote_addr_seen(&server, "127.0.0.1", &xff("203.0.113.10"), b"").await;
    assert_eq!(again, Err(429));
}

#[tokio::test]
async fn a_spoofed_forwarding_header_from_an_untrusted_peer_changes_nothing() {
    let server = TestServer::start(Config {
        trusted_proxies: vec!["127.0.0.1".parse().unwrap()],
        max_connections_per_ip: 1,
        ..config()
    })
    .await;
    let spoof = [
        ("X-Forwarded-For", "203.0.113.7"),
        ("X-Real-IP", "203.0.113.8"),
        ("Forwarded", "for=203.0.113.9"),
    ];
    let seen = remote_addr_seen(&server, "127.0.0.2", &spoof, b"").await;
    assert_eq!(seen.map(|a| host(&a)), Ok("127.0.0.2".to_owned()));
    // Its limit is its own address's, whatever it claims.
    let source = Some("127.0.0.3".parse().unwrap());
    let (status, _held) = common::raw_handshake(server.addr, "/ws", &spoof, source).await;
    assert_eq!(status, 101);
    server.wait_for_sessions(1).await;
    let again = remote_addr_seen(
        &server,
        "127.0.0.3",
        &[("X-Forwarded-For", "198.51.100.1")],
        b"",
    )
    .await;
    assert_eq!(again, Err(429));
    // Without --trusted-proxy no one is trusted, loopback included.
    let plain = TestServer::start(config()).await;
    let seen = remote_addr_seen(&plain, "127.0.0.1", &spoof, b"").await;
    assert_eq!(seen.map(|a| host(&a)), Ok("127.0.0.1".to_owned()));
}

#[tokio::test]
async fn a_trusted_load_balancer_names_the_client_with_the_proxy_protocol() {
    let server = TestServer::start(Config {
        trusted_proxies: vec!["127.0.0.1".parse().unwrap()],
        proxy_protocol: true,
        ..config()
    })
    .await;
    let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\n";
    let seen = remote_addr_seen(&server, "127.0.0.1", &[], v1).await;
    assert_eq!(seen, Ok("203.0.113.7:51000".to_owned()));
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend([198, 51, 100, 9, 10, 0, 0, 1]);
    v2.extend(4242u16.to_be_bytes());
    v2.extend(443u16.to_be_bytes());
    let seen = remote_addr_seen(&server, "127.0.0.1", &[], &v2).await;
    assert_eq!(seen, Ok("198.51.100.9:4242".to_owned()));
    // Headers do not override what the load balancer said.
    let seen = remote_addr_seen(&server, "127.0.0.1", &[("X-Forwarded-For", "1.1.1.1")], v1).await;
    assert_eq!(seen, Ok("203.0.113.7:51000".to_owned()));
    // An untrusted peer's PROXY header is not believed: it is just a bad request.
    let tcp = tokio::net::TcpSocket::new_v4().unwrap();
    tcp.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut tcp = tcp.connect(server.addr).await.unwrap();
    use tokio::io::AsyncWriteExt;
    tcp.write_all(v1).await.unwrap();
    let response = read_response(&mut tcp).await;
    assert!(response.starts_with("http/1.1 400"), "{response}");
}

#[tokio::test]
async fn a_trusted_load_balancer_without_a_proxy_header_is_told_so_with_400() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start(Config {
        trusted_proxies: vec!["127.0.0.1".parse().unwrap()],
        proxy_protocol: true,
        ..config()
    })
    .await;
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let response = read_response(&mut tcp).await;
    assert!(response.starts_with("http/1.1 400"), "{response}");
    assert!(response.contains("proxy protocol header"), "{response}");
}

#[tokio::test]
async fn past_the_bound_on_refusals_in_flight_each_is_still_answered() {
    // --max-handshakes 2 allows 8 refusals in flight; the clients below read
    // nothing until all are refused, so the first 8 linger and the rest go
    // past the bound.
    let server = TestServer::start(Config {
        max_handshakes: 2,
        max_handshakes_per_ip: 1,
        ..config()
    })
    .await;
    let _holds_the_address = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut refused = Vec::new();
    for _ in 0..20 {
        refused.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    for (i, tcp) in refused.iter_mut().enumerate() {
        let response = read_response(tcp).await;
        assert!(
            response.starts_with("http/1.1 429"),
            "refusal {i}: {response}"
        );
        assert!(response.contains("\r\nretry-after: 1\r\n"), "{response}");
    }
    let counters = server.node.counter_snapshot();
    assert_eq!(counters.refused_handshakes_per_address, 20);
    assert!(counters.refusals_answered_at_once >= 12, "{counters:?}");
}

#[tokio::test]
async fn over_tls_a_refused_connection_still_gets_its_429() {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let dir = std::env::temp_dir().join(format!("wsproto-edge-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let server = TestServer::start(Config {
        tls_cert: Some(cert_path.clone()),
        tls_key: Some(key_path),
        max_handshakes_per_ip: 1,
        ..config()
    })
    .await;
    // One connection that never starts its TLS handshake holds the slot.
    let _idle = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let tls = wsproto_client::tls_config(Some(&cert_path)).unwrap();
    let url = format!("wss://{}/ws", server.addr);
    match Client::connect_with(&url, Some(tls)).await {
        Err(ClientError::Refused { status, body }) => {
            assert_eq!(status, 429);
            assert!(body.contains("retry later"), "{body}");
        }
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
    let _ = std::fs::remove_dir_all(dir);
}
