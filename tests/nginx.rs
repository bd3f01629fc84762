//! wsproto behind real nginx, configured with the shipped
//! `deploy/nginx.conf` (addresses, ports and certificate paths rewritten),
//! in front of two in-process nodes: upgrades over ws and wss, per-client
//! limits counted on the real client addresses (clients bound to several
//! 127.0.0.x source addresses), and a node's shutdown reaching the client
//! as a close it can act on.

mod common;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{config, remote_addr_seen, TestServer};
use wsproto::{opcode, Config};
use wsproto_client::{tls_config, Client, ClientError};

/// A running nginx, killed (by PID) and its directory removed on drop,
/// also when a test panics.
struct Nginx {
    child: Child,
    dir: PathBuf,
    /// Plain HTTP (ws://) and TLS (wss://) listeners.
    http: SocketAddr,
    https: SocketAddr,
    /// The certificate nginx serves (self-signed, for 127.0.0.1).
    cert: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what nginx made of it.
        if std::thread::panicking() {
            eprintln!("nginx error log:\n{}", self.error_log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_loopback_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// `deploy/nginx.conf` with its upstreams, listeners and certificate
/// replaced by the test's (the lines marked `test:` there).
fn site_config(nodes: &[SocketAddr], http: SocketAddr, https: SocketAddr, dir: &Path) -> String {
    let shipped = include_str!("../deploy/nginx.conf");
    let mut out = String::new();
    let mut upstreams_written = false;
    for line in shipped.lines() {
        let trimmed = line.trim();
        let replacement = if trimmed.starts_with("server 10.0.0.") {
            if upstreams_written {
                continue;
            }
            upstreams_written = true;
            nodes
                .iter()
                .map(|node| format!("    server {node} max_fails=1 fail_timeout=5s;"))
                .collect::<Vec<_>>()
                .join("\n")
        } else if trimmed.starts_with("listen [::]") {
            continue;
        } else if trimmed == "listen 80;" {
            format!("    listen {http};")
        } else if trimmed == "listen 443 ssl;" {
            format!("    listen {https} ssl;")
        } else if trimmed.starts_with("ssl_certificate ") {
            format!("    ssl_certificate {};", dir.join("cert.pem").display())
        } else if trimmed.starts_with("ssl_certificate_key ") {
            format!("    ssl_certificate_key {};", dir.join("key.pem").display())
        } else {
            line.to_owned()
        };
        out.push_str(&replacement);
        out.push('\n');
    }
    assert!(upstreams_written, "deploy/nginx.conf lists its upstreams");
    out
}

impl Nginx {
    /// Starts nginx in front of `nodes` on free loopback ports.
    async fn start(nodes: &[SocketAddr]) -> Nginx {
        let binary = common::external::require("nginx");
        let dir = std::env::temp_dir().join(format!(
            "wsproto-nginx-{}-{}",
            std::process::id(),
            free_loopback_port()
        ));
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();

        let http: SocketAddr = format!("127.0.0.1:{}", free_loopback_port())
            .parse()
            .unwrap();
        let https: SocketAddr = format!("127.0.0.1:{}", free_loopback_port())
            .parse()
            .unwrap();
        std::fs::write(dir.join("site.conf"), site_config(nodes, http, https, &dir)).unwrap();
        let d = dir.display();
        let main = format!(
            "master_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/tmp/body;\n\
               proxy_temp_path {d}/tmp/proxy;\n  fastcgi_temp_path {d}/tmp/fastcgi;\n\
               uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n\
               include {d}/site.conf;\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), main).unwrap();
        let child = Command::new(binary)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx starts");
        let mut nginx = Nginx {
            child,
            cert: dir.join("cert.pem"),
            dir,
            http,
            https,
        };
        for _ in 0..100 {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!("nginx exited ({status}): {}", nginx.error_log());
            }
            if tokio::net::TcpStream::connect(http).await.is_ok() {
                return nginx;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("nginx did not listen within 10 s: {}", nginx.error_log());
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

/// Two wsproto nodes that trust nginx (127.0.0.1) to name the client.
async fn nodes(max_connections_per_ip: usize) -> Vec<TestServer> {
    let config = || Config {
        trusted_proxies: vec!["127.0.0.1".parse().unwrap()],
        max_connections_per_ip,
        ..config()
    };
    vec![
        TestServer::start(config()).await,
        TestServer::start(config()).await,
    ]
}

fn host(addr: &str) -> String {
    addr.parse::<SocketAddr>()
        .map_or(addr.to_owned(), |a| a.ip().to_string())
}

#[tokio::test]
#[cfg_attr(missing_nginx, ignore = "needs nginx: apt-get install -y nginx")]
async fn through_nginx_upgrades_work_and_limits_count_per_real_client() {
    let nodes = nodes(2).await;
    let nginx = Nginx::start(&[nodes[0].addr, nodes[1].addr]).await;

    // The nodes see each client's own address, not nginx's.
    for source in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        let seen = remote_addr_seen(nginx.http, source, &[], b"").await;
        assert_eq!(seen.map(|a| host(&a)), Ok(source.to_owned()));
    }
    // A spoofed X-Forwarded-For is appended to, not believed.
    let spoofed = remote_addr_seen(
        nginx.http,
        "127.0.0.5",
        &[("X-Forwarded-For", "203.0.113.7")],
        b"",
    )
    .await;
    assert_eq!(spoofed.map(|a| host(&a)), Ok("127.0.0.5".to_owned()));

    // Two sessions per client address: a third from 127.0.0.6 is refused,
    // while other clients, all behind the same nginx, still get in.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(connect_from(nginx.http, "127.0.0.6").await.unwrap());
    }
    assert!(matches!(
        connect_from(nginx.http, "127.0.0.6").await,
        Err(429)
    ));
    for source in ["127.0.0.7", "127.0.0.8", "127.0.0.7"] {
        held.push(connect_from(nginx.http, source).await.unwrap());
    }
    assert_eq!(nodes[0].hub.len() + nodes[1].hub.len(), 5);

    // wss:// terminated by nginx.
    let tls = tls_config(Some(&nginx.cert)).unwrap();
    let url = format!("wss://{}/ws", nginx.https);
    let mut client = Client::connect_with(&url, Some(tls)).await.unwrap();
    client.welcome().await.unwrap();
    let reply = client.call(opcode::ECHO, "via nginx").await.unwrap();
    assert_eq!(reply.payload, "via nginx");
}

/// A WebSocket through nginx from `source`, past its WELCOME; or the
/// HTTP status of the refusal.
async fn connect_from(
    nginx: SocketAddr,
    source: &str,
) -> Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, u16> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Error;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    let tcp = socket.connect(nginx).await.unwrap();
    match tokio_tungstenite::client_async(format!("ws://{nginx}/ws"), tcp).await {
        Ok((mut ws, _)) => {
            let welcome = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
            assert!(matches!(welcome, Ok(Some(Ok(_)))), "WELCOME: {welcome:?}");
            Ok(ws)
        }
        Err(Error::Http(response)) => Err(response.status().as_u16()),
        Err(err) => panic!("{err}"),
    }
}

#[tokio::test]
#[cfg_attr(missing_nginx, ignore = "needs nginx: apt-get install -y nginx")]
async fn a_node_shutting_down_reaches_the_client_through_nginx_as_1001_and_it_reconnects() {
    let mut nodes = nodes(100).await;
    let nginx = Nginx::start(&[nodes[0].addr, nodes[1].addr]).await;
    let url = format!("ws://{}/ws", nginx.http);
    let mut client = Client::connect(&url).await.unwrap();
    client.welcome().await.unwrap();
    let serving = nodes
        .iter()
        .position(|node| node.hub.len() == 1)
        .expect("one node holds the session");
    let stopping = tokio::spawn(nodes.remove(serving).shutdown());

    // The close code tells the client to reconnect (later, or elsewhere).
    match client.recv_timeout(Duration::from_secs(10)).await {
        Err(ClientError::Closed { code, reason }) => {
            assert_eq!(code, 1001);
            assert!(
                reason.starts_with("server shutting down; reconnect after "),
                "{reason}"
            );
        }
        other => panic!("expected close 1001 through nginx, got {other:?}"),
    }
    // Reconnecting lands on the node still up: nginx skips the draining
    // one (503) or the stopped one (refused). Like any client, this one
    // retries a refused upgrade with back-off; it must get in well within
    // the upstreams' fail_timeout.
    let mut again = reconnect(&url, Duration::from_secs(4)).await;
    again.welcome().await.unwrap();
    assert_eq!(
        again.call(opcode::ECHO, "back").await.unwrap().payload,
        "back"
    );
    assert_eq!(nodes[0].hub.len(), 1);
    stopping.await.unwrap().unwrap();
    drop(nginx);
}

/// Connects to `url`, retrying refused upgrades (nginx answers 502 or 503
/// while it has no node to offer) with back-off for up to `within`.
async fn reconnect(url: &str, within: Duration) -> Client {
    let deadline = tokio::time::Instant::now() + within;
    let mut pause = Duration::from_millis(50);
    loop {
        match Client::connect(url).await {
            Ok(client) => return client,
            Err(err) if tokio::time::Instant::now() + pause < deadline => {
                eprintln!("reconnect refused ({err}); retrying in {pause:?}");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            Err(err) => panic!("no node took the reconnect within {within:?}: {err}"),
        }
    }
}
