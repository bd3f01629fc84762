//! An async client for the opcode protocol, used by the CLI and the tests.

use std::{collections::VecDeque, path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use rustls_pki_types::{pem::PemObject, CertificateDer};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    tungstenite::{self, client::IntoClientRequest, protocol::CloseFrame, Message},
    MaybeTlsStream, WebSocketStream,
};
use wsproto::{frame::FrameError, opcode, proto::v1, Frame};

use crate::positions::Positions;

/// How long [`Client::close`] waits for the server's answering close.
pub const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// What went wrong talking to a server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL does not parse or is not ws:// / wss://.
    #[error("invalid URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    /// No TCP connection could be made.
    #[error("cannot connect to {url}: {error}")]
    Connect { url: String, error: std::io::Error },
    /// The server answered the upgrade with an HTTP error.
    #[error("server refused the WebSocket upgrade: HTTP {status}{}", if .body.is_empty() { String::new() } else { format!(": {}", .body) })]
    Refused {
        status: u16,
        /// The first line of the response body, shortened.
        body: String,
    },
    /// The URL leads to a web page, not a WebSocket endpoint (for example
    /// the demo page at `/` when the `/ws` path was left out).
    #[error("{url} answered with a web page (HTTP {status}), not a WebSocket; the opcode protocol is at {suggestion}")]
    WebPage {
        url: String,
        status: u16,
        /// The URL of the opcode-protocol endpoint on the same server.
        suggestion: String,
    },
    /// The server closed the connection.
    #[error("server closed the connection: {code} {reason}")]
    Closed { code: u16, reason: String },
    /// The server sent bytes that are not a frame.
    #[error("server sent an invalid frame: {0}")]
    BadFrame(#[from] FrameError),
    /// The server answered a request with an ERROR frame.
    #[error("server replied {} ({code}) to opcode {opcode}: {message}", wsproto::ErrorCode::from_u32(*.code).map_or("application error", |c| c.name()))]
    ErrorFrame {
        code: u32,
        message: String,
        opcode: u32,
    },
    /// The server sent a frame other than the one the protocol calls for.
    #[error("expected {expected}, got a frame with opcode {opcode}")]
    Unexpected { expected: &'static str, opcode: u32 },
    /// The server sent a text message; the protocol is binary.
    #[error("server sent a text message")]
    UnexpectedText,
    /// Nothing arrived in time.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The token cannot be sent in a header.
    #[error("the token cannot be sent: it holds characters an HTTP header cannot carry (a JWT is letters, digits, '-', '_' and '.')")]
    InvalidToken,
    /// The TLS settings are unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The WebSocket failed.
    #[error("connection failed: {0}")]
    WebSocket(#[from] tungstenite::Error),
}

/// A connection to a wsproto server.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Frames read while waiting for a particular reply, in arrival order.
    pending: VecDeque<Frame>,
    next_request_id: u32,
}

impl Client {
    /// Connects and completes the WebSocket handshake.
    ///
    /// # Errors
    /// [`ClientError::Url`], [`ClientError::Connect`] or
    /// [`ClientError::Refused`], each saying what failed.
    pub async fn connect(url: &str) -> Result<Client, ClientError> {
        Client::connect_with(url, None).await
    }

    /// [`Client::connect_with`], sending `token` as `Authorization: Bearer`.
    ///
    /// # Errors
    /// As [`Client::connect`].
    pub async fn connect_with_token(
        url: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        token: Option<&str>,
    ) -> Result<Client, ClientError> {
        Client::open(url, tls, token).await
    }

    /// [`Client::connect`] with this TLS configuration for `wss://` URLs
    /// (see [`tls_config`]); `None` trusts the public web roots.
    ///
    /// # Errors
    /// As [`Client::connect`].
    pub async fn connect_with(
        url: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Client, ClientError> {
        Client::open(url, tls, None).await
    }

    async fn open(
        url: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        token: Option<&str>,
    ) -> Result<Client, ClientError> {
        let invalid = |reason: String| ClientError::Url {
            url: url.to_owned(),
            reason,
        };
        if !(url.starts_with("ws://") || url.starts_with("wss://")) {
            return Err(invalid("the scheme must be ws:// or wss://".into()));
        }
        let mut request = url
            .into_client_request()
            .map_err(|e| invalid(e.to_string()))?;
        if let Some(token) = token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| ClientError::InvalidToken)?;
            request.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::header::AUTHORIZATION,
                value,
            );
        }
        let connector = tls.map(tokio_tungstenite::Connector::Rustls);
        match tokio_tungstenite::connect_async_tls_with_config(request, None, false, connector)
            .await
        {
            Ok((ws, _response)) => Ok(Client {
                ws,
                pending: VecDeque::new(),
                next_request_id: 1,
            }),
            Err(err) => Err(connect_error(url, err)),
        }
    }

    /// Sends one frame.
    ///
    /// # Errors
    /// When the connection is gone.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), ClientError> {
        self.send_raw(Message::Binary(frame.encode())).await
    }

    /// Sends any WebSocket message, valid frame or not (tests use this).
    ///
    /// # Errors
    /// When the connection is gone.
    pub async fn send_raw(&mut self, message: Message) -> Result<(), ClientError> {
        Ok(self.ws.send(message).await?)
    }

    /// The next frame from the server.
    ///
    /// # Errors
    /// [`ClientError::Closed`] once the server has closed the connection,
    /// and the other variants when the connection fails or the server
    /// breaks the protocol.
    pub async fn recv(&mut self) -> Result<Frame, ClientError> {
        if let Some(frame) = self.pending.pop_front() {
            return Ok(frame);
        }
        self.read_frame().await
    }

    /// [`Client::recv`], giving up after `timeout`.
    ///
    /// # Errors
    /// As [`Client::recv`], and [`ClientError::Timeout`].
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<Frame, ClientError> {
        tokio::time::timeout(timeout, self.recv())
            .await
            .map_err(|_| ClientError::Timeout(timeout))?
    }

    async fn read_frame(&mut self) -> Result<Frame, ClientError> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Binary(data))) => return Ok(Frame::decode(data)?),
                Some(Ok(Message::Text(_))) => return Err(ClientError::UnexpectedText),
                Some(Ok(Message::Close(frame))) => return Err(closed(frame)),
                Some(Ok(_)) => continue,
                Some(Err(tungstenite::Error::ConnectionClosed)) | None => return Err(closed(None)),
                Some(Err(err)) => return Err(err.into()),
            }
        }
    }

    /// A request id not used yet on this connection.
    pub fn next_request_id(&mut self) -> u32 {
        let id = self.next_request_id;
        self.next_request_id = self.next_request_id.wrapping_add(1).max(1);
        id
    }

    /// Sends `opcode` + `payload` with a fresh request id and returns the
    /// frame that answers it (a reply, an ACK or an ERROR frame). Frames
    /// that arrive meanwhile stay queued for [`Client::recv`].
    ///
    /// # Errors
    /// As [`Client::recv`].
    pub async fn call(
        &mut self,
        opcode: u32,
        payload: impl Into<Bytes>,
    ) -> Result<Frame, ClientError> {
        let id = self.next_request_id();
        self.send(&Frame::new(opcode, payload).with_request_id(Some(id)))
            .await?;
        loop {
            let frame = self.read_frame().await?;
            if frame.request_id == Some(id) {
                return Ok(frame);
            }
            self.pending.push_back(frame);
        }
    }

    /// A frame read earlier while waiting for a reply, if any (what
    /// [`Client::recv`] returns next without reading the socket).
    pub fn pending_frame(&mut self) -> Option<Frame> {
        self.pending.pop_front()
    }

    /// Reads the WELCOME frame that opens every session.
    ///
    /// # Errors
    /// When the first frame is not a valid WELCOME.
    pub async fn welcome(&mut self) -> Result<v1::Welcome, ClientError> {
        self.recv_message(opcode::WELCOME, "a WELCOME frame", Duration::from_secs(5))
            .await
    }

    /// The next frame, which must have `opcode` and a payload of type `M`.
    async fn recv_message<M: prost::Message + Default>(
        &mut self,
        opcode: u32,
        expected: &'static str,
        timeout: Duration,
    ) -> Result<M, ClientError> {
        let frame = self.recv_timeout(timeout).await?;
        let unexpected = ClientError::Unexpected {
            expected,
            opcode: frame.opcode,
        };
        match frame.opcode == opcode {
            true => M::decode(frame.payload).map_err(|_| unexpected),
            false => Err(unexpected),
        }
    }

    /// Sends Close `code` and waits up to [`CLOSE_WAIT`] for the server's
    /// answering close, as a well-behaved client does. Returns the server's
    /// close frame, if one arrived.
    ///
    /// # Errors
    /// When the close frame cannot be sent.
    pub async fn close(mut self, code: u16) -> Result<Option<CloseFrame>, ClientError> {
        let frame = CloseFrame {
            code: code.into(),
            reason: "".into(),
        };
        self.ws.close(Some(frame)).await?;
        let answer = tokio::time::timeout(CLOSE_WAIT, async {
            while let Some(message) = self.ws.next().await {
                if let Ok(Message::Close(frame)) = message {
                    return frame;
                }
            }
            None
        });
        Ok(answer.await.ok().flatten())
    }
}

impl Client {
    /// Sends a request with a fresh id and returns the reply payload decoded
    /// as `R`, or the ERROR frame as [`ClientError::ErrorFrame`]. An ACK
    /// decodes as `R::default()`.
    ///
    /// # Errors
    /// As [`Client::call`], and for an ERROR or undecodable reply.
    pub async fn request<R: prost::Message + Default>(
        &mut self,
        opcode: u32,
        request: &impl prost::Message,
    ) -> Result<R, ClientError> {
        let reply = self.call(opcode, request.encode_to_vec()).await?;
        self.decode_reply(reply)
    }

    fn decode_reply<R: prost::Message + Default>(&self, reply: Frame) -> Result<R, ClientError> {
        if let Some(error) = error_of(&reply) {
            return Err(ClientError::ErrorFrame {
                code: error.code,
                message: error.message,
                opcode: error.opcode,
            });
        }
        R::decode(reply.payload).map_err(|_| ClientError::Unexpected {
            expected: "a reply payload of the documented type",
            opcode: reply.opcode,
        })
    }

    /// Subscribes to topics or patterns.
    ///
    /// # Errors
    /// As [`Client::request`].
    pub async fn subscribe(&mut self, topics: &[&str]) -> Result<(), ClientError> {
        let topics = topics.iter().map(|t| t.to_string()).collect();
        let subscribe = v1::Subscribe {
            topics,
            ..Default::default()
        };
        self.request::<()>(opcode::SUBSCRIBE, &subscribe).await
    }

    /// Subscribes and recovers: asks for the messages published since the
    /// positions in `positions` (for the streams the topics cover) and for
    /// where each named stream stands. Missed messages arrive before the
    /// reply, which this returns; feed every delivery to
    /// [`Positions::observe`] to keep positions and drop duplicates.
    ///
    /// # Errors
    /// As [`Client::request`].
    pub async fn subscribe_since(
        &mut self,
        topics: &[&str],
        positions: &Positions,
    ) -> Result<v1::Subscribed, ClientError> {
        let subscribe = v1::Subscribe {
            topics: topics.iter().map(|t| t.to_string()).collect(),
            since: positions.topics_covered_by(topics),
            positions: true,
        };
        let reply = self
            .call(opcode::SUBSCRIBE, subscribe.encode_to_vec())
            .await?;
        self.decode_reply(reply)
    }

    /// Publishes to a topic (where the server permits it).
    ///
    /// # Errors
    /// As [`Client::request`].
    pub async fn publish(
        &mut self,
        topic: &str,
        data: impl Into<Bytes>,
    ) -> Result<v1::Published, ClientError> {
        let publish = v1::Publish {
            topic: topic.into(),
            data: data.into(),
            opcode: 0,
        };
        self.request(opcode::PUBLISH, &publish).await
    }

    /// Joins a room and returns who is in it.
    ///
    /// # Errors
    /// As [`Client::request`].
    pub async fn join(
        &mut self,
        room: &str,
        presence_events: bool,
    ) -> Result<v1::Presence, ClientError> {
        let join = v1::Join {
            room: room.into(),
            presence_events,
            since: None,
        };
        self.request(opcode::JOIN, &join).await
    }

    /// [`Client::join`], recovering what was said in the room since the
    /// position `positions` keeps for it (see [`Client::subscribe_since`]).
    ///
    /// # Errors
    /// As [`Client::request`].
    pub async fn join_since(
        &mut self,
        room: &str,
        presence_events: bool,
        positions: &Positions,
    ) -> Result<v1::Presence, ClientError> {
        let join = v1::Join {
            room: room.into(),
            presence_events,
            since: positions.room(room),
        };
        self.request(opcode::JOIN, &join).await
    }

    /// Says something in a joined room.
    ///
    /// # Errors
    /// As [`Client::request`].
    pub async fn say(
        &mut self,
        room: &str,
        data: impl Into<Bytes>,
        include_self: bool,
    ) -> Result<v1::Published, ClientError> {
        let say = v1::Say {
            room: room.into(),
            data: data.into(),
            include_self,
        };
        self.request(opcode::SAY, &say).await
    }

    /// The next DELIVERY frame, skipping nothing else: any other frame is
    /// an [`ClientError::Unexpected`].
    ///
    /// # Errors
    /// As [`Client::recv_timeout`].
    pub async fn delivery(&mut self, timeout: Duration) -> Result<v1::Delivery, ClientError> {
        self.recv_message(opcode::DELIVERY, "a DELIVERY frame", timeout)
            .await
    }
}

/// A TLS configuration trusting the public web roots and, when given, the
/// CA certificates in `ca_file` (PEM), e.g. a private CA.
///
/// # Errors
/// [`ClientError::Tls`] when the file cannot be read or holds no certificate.
pub fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<_, _>>())
            .map_err(|e| ClientError::Tls(format!("cannot read {}: {e}", path.display())))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(ClientError::Tls(format!(
                "no CA certificate in {}",
                path.display()
            )));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The ERROR payload of `frame`, when it is an ERROR frame.
pub fn error_of(frame: &Frame) -> Option<v1::Error> {
    (frame.opcode == opcode::ERROR)
        .then(|| v1::Error::decode(frame.payload.clone()).ok())
        .flatten()
}

fn closed(frame: Option<CloseFrame>) -> ClientError {
    match frame {
        Some(frame) => ClientError::Closed {
            code: frame.code.into(),
            reason: frame.reason.to_string(),
        },
        None => ClientError::Closed {
            code: 1006,
            reason: "connection closed without a close frame".into(),
        },
    }
}

fn connect_error(url: &str, err: tungstenite::Error) -> ClientError {
    match err {
        tungstenite::Error::Io(error) => ClientError::Connect {
            url: url.to_owned(),
            error,
        },
        tungstenite::Error::Http(response) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            let start = body.trim_start();
            let html = ["<!doctype html", "<html"].iter().any(|tag| {
                start
                    .get(..tag.len())
                    .is_some_and(|s| s.eq_ignore_ascii_case(tag))
            });
            if html {
                return ClientError::WebPage {
                    url: url.to_owned(),
                    status,
                    suggestion: protocol_url(url),
                };
            }
            ClientError::Refused {
                status,
                body: first_line(&body, 200),
            }
        }
        tungstenite::Error::Url(reason) => ClientError::Url {
            url: url.to_owned(),
            reason: reason.to_string(),
        },
        other => other.into(),
    }
}

/// The first non-empty line of `text`, at most `max` characters (with `…`
/// when cut), so a long error body still prints as one line.
fn first_line(text: &str, max: usize) -> String {
    let line = text.lines().map(str::trim).find(|l| !l.is_empty());
    let line = line.unwrap_or_default();
    match line.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line.to_owned(),
    }
}

/// The opcode-protocol endpoint (`/ws`) on the server of `url`: the same
/// scheme and host, the default path, no query.
pub fn protocol_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("ws", url));
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    format!("{scheme}://{host}/ws")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocol_url_keeps_scheme_and_host() {
        assert_eq!(
            protocol_url("ws://127.0.0.1:8080"),
            "ws://127.0.0.1:8080/ws"
        );
        assert_eq!(protocol_url("wss://h:1/echo?x=1"), "wss://h:1/ws");
        assert_eq!(protocol_url("ws://[::1]:9/"), "ws://[::1]:9/ws");
    }

    #[test]
    fn long_bodies_print_as_one_short_line() {
        assert_eq!(first_line("\n  not found \nmore", 200), "not found");
        assert_eq!(first_line("ééé", 2), "éé…");
        assert_eq!(first_line("", 2), "");
    }
}
