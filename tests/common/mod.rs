//! Shared set-up: a real server on port 0 and real clients.
#![allow(dead_code)] // each test file uses its own subset

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use wsproto::{broker::Broker, handlers, Config, Hub, Node, Router};
pub use wsproto_client::{error_of, Client};
pub mod cluster;
pub mod external;

/// A server running in this process on 127.0.0.1 and a free port.
pub struct TestServer {
    pub addr: SocketAddr,
    pub hub: Hub,
    pub node: Node,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    /// Starts the built-in handlers with `config`.
    pub async fn start(config: Config) -> TestServer {
        TestServer::with_router(config, handlers::builtin()).await
    }

    /// Starts `router` with `config`.
    pub async fn with_router(config: Config, router: Router) -> TestServer {
        TestServer::with_broker(config, router, None).await
    }

    /// Starts `router` with `config`, publishing through `broker` when given
    /// (servers sharing a broker act as one deployment).
    pub async fn with_broker(
        config: Config,
        router: Router,
        broker: Option<Arc<dyn Broker>>,
    ) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut server = wsproto::Server::from_listener(listener, config, router).unwrap();
        if let Some(broker) = broker {
            server = server.with_broker(broker);
        }
        let (addr, hub, node) = (server.local_addr().unwrap(), server.hub(), server.node());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            hub,
            node,
            stop: Some(stop),
            task,
        }
    }

    /// The opcode-protocol endpoint.
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Another path on this server.
    pub fn url_of(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// A client connected to `/ws`, past its WELCOME frame.
    pub async fn client(&self) -> Client {
        self.client_with("").await
    }

    /// A client connected to `/ws?QUERY`, past its WELCOME frame.
    pub async fn client_with(&self, query: &str) -> Client {
        let url = match query {
            "" => self.url(),
            query => format!("{}?{query}", self.url()),
        };
        let mut client = Client::connect(&url).await.unwrap();
        client.welcome().await.unwrap();
        client
    }

    /// POSTs `json` to the publish API with `key`; returns status and JSON body.
    pub async fn publish_api(&self, key: Option<&str>, json: &str) -> (u16, serde_json::Value) {
        let url = format!("http://{}/api/publish", self.addr);
        let (status, body) = wsproto_client::http::post_json(&url, key, json)
            .await
            .unwrap();
        let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        (status.as_u16(), body)
    }

    /// Waits until the hub holds `n` sessions; panics after 10 s.
    pub async fn wait_for_sessions(&self, n: usize) {
        let hub = self.hub.clone();
        let waited = tokio::time::timeout(Duration::from_secs(10), async move {
            while hub.len() != n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        if waited.await.is_err() {
            panic!("expected {n} sessions, have {}", self.hub.len());
        }
    }

    /// Triggers graceful shutdown and waits for `run` to return.
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.unwrap()
    }
}

/// The API key test servers are started with.
pub const API_KEY: &str = "test-key";

/// A config for tests: loopback, and quick timeouts.
pub fn config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        shutdown_timeout: Duration::from_secs(2),
        api_key: Some(API_KEY.into()),
        // Tests drive clients much faster than people do; the limit has
        // its own tests.
        rate_limit: 0.0,
        ..Config::default()
    }
}

/// The flag [`wsproto::Server::from_listener`] names when it refuses
/// `config` as a start-up error; `None` when it accepts it.
pub async fn refused_flag(config: Config) -> Option<&'static str> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    match wsproto::Server::from_listener(listener, config, handlers::builtin()) {
        Ok(_) => None,
        Err(wsproto::ServerError::Config { flag, .. }) => Some(flag),
        Err(err) => panic!("not a configuration error: {err}"),
    }
}

/// Asserts `frame` is an ERROR frame with `code` about `opcode`.
pub fn assert_error(frame: &wsproto::Frame, code: wsproto::ErrorCode, opcode: u32) {
    let error = error_of(frame).unwrap_or_else(|| panic!("expected an error frame, got {frame:?}"));
    assert_eq!(
        (error.code, error.opcode),
        (code.as_u32(), opcode),
        "{error:?}"
    );
}

/// Opens a WebSocket at the TCP level (handshake done by hand) and returns
/// the socket right after the 101 response: a client that does nothing the
/// library would do for it, such as answering pings.
pub async fn raw_websocket(addr: SocketAddr, path: &str) -> tokio::net::TcpStream {
    let (status, tcp) = raw_handshake(addr, path, &[], None).await;
    assert_eq!(status, 101);
    tcp
}

/// Sends a WebSocket handshake with `extra` headers, from `source` if
/// given; returns the response status and the socket after the headers.
pub async fn raw_handshake(
    addr: SocketAddr,
    path: &str,
    extra: &[(&str, &str)],
    source: Option<std::net::IpAddr>,
) -> (u16, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(source) = source {
        socket.bind(SocketAddr::new(source, 0)).unwrap();
    }
    let mut tcp = socket.connect(addr).await.unwrap();
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (name, value) in extra {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await.unwrap());
    }
    let status = String::from_utf8_lossy(&head[9..12]).parse().unwrap();
    (status, tcp)
}

/// Whether `bytes` (server → client, so unmasked) contain a close frame with `code`.
pub fn contains_close_frame(bytes: &[u8], code: u16) -> bool {
    bytes.windows(4).any(|w| {
        w[0] == 0x88 && w[1] >= 2 && w[1] < 126 && u16::from_be_bytes([w[2], w[3]]) == code
    })
}

/// A plain `GET path` over HTTP/1.1; returns the whole response as text.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    http_request(addr, "GET", path).await
}

/// A body-less `METHOD path` over HTTP/1.1; returns the whole response as text.
pub async fn http_request(addr: SocketAddr, method: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    response
}

/// Opens a WebSocket to `/ws` at `addr` from the local
/// address `source`, first sending `preamble` (e.g. a PROXY protocol
/// header), then an upgrade with `headers`; returns the client address the
/// server reports in GET_INFO, or the HTTP status it refused the upgrade with.
pub async fn remote_addr_seen(
    addr: SocketAddr,
    source: &str,
    headers: &[(&str, &str)],
    preamble: &[u8],
) -> Result<String, u16> {
    use futures_util::{SinkExt, StreamExt};
    use prost::Message as _;
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Error, Message};
    use wsproto::{opcode, proto::v1, Frame};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    let mut tcp = socket.connect(addr).await.unwrap();
    tcp.write_all(preamble).await.unwrap();
    let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let mut ws = match tokio_tungstenite::client_async(request, tcp).await {
        Ok((ws, _)) => ws,
        Err(Error::Http(response)) => return Err(response.status().as_u16()),
        Err(err) => panic!("{err}"),
    };
    let get_info = Frame::new(opcode::GET_INFO, bytes::Bytes::new()).encode();
    ws.send(Message::Binary(get_info)).await.unwrap();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("GET_INFO answered in time")
            .unwrap()
            .unwrap();
        if let Message::Binary(data) = message {
            let frame = Frame::decode(data).unwrap();
            if frame.opcode == opcode::GET_INFO {
                let info = v1::Info::decode(frame.payload).unwrap();
                return Ok(info.session.unwrap().remote_addr);
            }
        }
    }
}

/// The next event of `subscriber` that is a delivery or a gap (reports of
/// (re)subscriptions and other frames are skipped); panics after 10 s.
pub async fn next_message(subscriber: &mut wsproto_client::Subscriber) -> wsproto_client::Event {
    use wsproto_client::Event;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), subscriber.next())
            .await
            .expect("an event within 10 s")
            .unwrap();
        match event {
            Event::Subscribed { .. } | Event::Frame(_) => continue,
            event => return event,
        }
    }
}

/// The next event of `subscriber`, which must be a delivery.
pub async fn delivery(subscriber: &mut wsproto_client::Subscriber) -> wsproto::proto::v1::Delivery {
    match next_message(subscriber).await {
        wsproto_client::Event::Delivery(delivery) => delivery,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

/// An encoded PUBLISH frame with request id `id`.
pub fn publish_frame(id: u32, topic: &str, data: impl Into<bytes::Bytes>) -> bytes::Bytes {
    use prost::Message as _;
    use wsproto::{opcode, proto::v1, Frame};

    let request = v1::Publish {
        topic: topic.to_owned(),
        data: data.into(),
        ..Default::default()
    };
    Frame::new(opcode::PUBLISH, request.encode_to_vec())
        .with_request_id(Some(id))
        .encode()
}

/// Sends, in one write, `count` PUBLISH frames to `topic` (payloads "0",
/// "1", …, request ids 1..=count), a PING after the first half and an
/// invalid PUBLISH after the first quarter, so the server reads them as
/// runs; then checks the answers: each in the order its frame was sent,
/// PUBLISHED seqs consecutive, the PING's PONG and the invalid frame's
/// error where they were sent. Returns the first seq.
pub async fn publish_in_one_burst(url: &str, topic: &str, count: u32) -> u64 {
    use futures_util::{SinkExt, StreamExt};
    use prost::Message as _;
    use tokio_tungstenite::tungstenite::Message;
    use wsproto::{opcode, proto::v1, Frame};

    const PING_ID: u32 = u32::MAX;
    const BAD_ID: u32 = u32::MAX - 1;
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let publish = |id: u32, topic: &str, n: u32| publish_frame(id, topic, n.to_string());
    let mut expected = Vec::new();
    for n in 0..count {
        if n == count / 4 {
            ws.feed(Message::Binary(publish(BAD_ID, "feed..bad", 0)))
                .await
                .unwrap();
            expected.push(BAD_ID);
        }
        if n == count / 2 {
            let ping = Frame::new(opcode::PING, "barrier").with_request_id(Some(PING_ID));
            ws.feed(Message::Binary(ping.encode())).await.unwrap();
            expected.push(PING_ID);
        }
        ws.feed(Message::Binary(publish(n + 1, topic, n)))
            .await
            .unwrap();
        expected.push(n + 1);
    }
    ws.flush().await.unwrap();

    let mut answered = Vec::new();
    let mut seqs = Vec::new();
    while answered.len() < expected.len() {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("every frame answered in time");
        let Some(Ok(Message::Binary(data))) = message else {
            continue;
        };
        let frame = Frame::decode(data).unwrap();
        let Some(id) = frame.request_id else {
            continue; // WELCOME
        };
        match id {
            PING_ID => assert_eq!(frame.opcode, opcode::PONG),
            BAD_ID => assert_eq!(frame.opcode, opcode::ERROR),
            _ => {
                assert_eq!(frame.opcode, opcode::PUBLISH, "{frame:?}");
                seqs.push(v1::Published::decode(frame.payload).unwrap().seq);
            }
        }
        answered.push(id);
    }
    assert_eq!(answered, expected, "answers in the order of the frames");
    let first = seqs[0];
    assert_eq!(
        seqs,
        (first..first + u64::from(count)).collect::<Vec<_>>(),
        "publications numbered in the order sent"
    );
    first
}
