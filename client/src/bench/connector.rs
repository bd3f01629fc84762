//! Opening benchmark connections: the server's addresses, source
//! addresses past one address pair's ephemeral ports, the connect ramp,
//! and a wsproto session's WELCOME.

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use tokio::{
    net::{TcpSocket, TcpStream},
    sync::Semaphore,
};
use tokio_tungstenite::{
    tungstenite::{client::IntoClientRequest, http::Uri, protocol::WebSocketConfig, Message},
    WebSocketStream,
};
use wsproto::{opcode, Frame};

use super::stats::Progress;

pub(super) type Ws = WebSocketStream<TcpStream>;

/// Handshakes in progress at once while connecting (under the server's
/// default `--max-handshakes-per-ip`).
const CONNECTING_AT_ONCE: usize = 128;
/// Idle connections per source address before another 127.0.0.x is used
/// (the ephemeral port range gives about 28,000 per address pair).
const CONNECTIONS_PER_SOURCE: usize = 25_000;
/// Longest wait for one connection: TCP, upgrade and WELCOME.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens WebSocket connections to one server, from chosen source addresses.
#[derive(Clone)]
pub(super) struct Connector {
    pub(super) url: String,
    /// The server's addresses, tried in order.
    pub(super) addrs: Vec<SocketAddr>,
    token: Option<String>,
    pub(super) raw: bool,
    pub(super) sources: Vec<IpAddr>,
    pub(super) config: WebSocketConfig,
}

impl Connector {
    pub(super) async fn new(
        url: &str,
        token: Option<&str>,
        raw: bool,
    ) -> anyhow::Result<Connector> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("invalid URL {url:?}"))?;
        if uri.scheme_str() != Some("ws") {
            bail!("bench speaks ws:// only (measure the server, not TLS): {url}");
        }
        let host = uri.host().context("URL without a host")?;
        let port = uri.port_u16().unwrap_or(80);
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
            .await
            .with_context(|| format!("cannot resolve {host}"))?
            .collect();
        if addrs.is_empty() {
            bail!("{host} resolves to no address");
        }
        Ok(Connector {
            url: url.to_owned(),
            addrs,
            token: token.map(str::to_owned),
            raw,
            sources: Vec::new(),
            // Small reads keep thousands of client connections cheap; frames
            // larger than the buffer are still read whole.
            config: WebSocketConfig::default()
                .read_buffer_size(16 * 1024)
                .max_message_size(None)
                .max_frame_size(None),
        })
    }

    /// A connector like this one (credentials, role, buffers) to another
    /// server, e.g. another node of a cluster.
    ///
    /// # Errors
    /// When `url` is not `ws://…` or its host does not resolve.
    pub(super) async fn to(&self, url: &str) -> anyhow::Result<Connector> {
        let mut other = Connector::new(url, self.token.as_deref(), self.raw).await?;
        other.sources.clone_from(&self.sources);
        other.config = self.config;
        Ok(other)
    }

    /// The URL with its path replaced (the baseline's `/sub` and `/pub`).
    pub(super) fn url_with_path(&self, path: &str) -> String {
        let after_scheme = self.url.find("://").map_or(0, |i| i + 3);
        let host_end = self.url[after_scheme..]
            .find('/')
            .map_or(self.url.len(), |i| after_scheme + i);
        format!("{}{path}", &self.url[..host_end])
    }

    /// Opens connection number `index` to `url`, within [`CONNECT_TIMEOUT`];
    /// a wsproto session's WELCOME is read before it is handed over.
    pub(super) async fn connect(&self, url: &str, index: usize) -> anyhow::Result<Ws> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.open(url, index))
            .await
            .with_context(|| format!("no WebSocket session within {CONNECT_TIMEOUT:?}"))?
    }

    async fn open(&self, url: &str, index: usize) -> anyhow::Result<Ws> {
        let mut last_error = None;
        let mut tcp = None;
        for &addr in &self.addrs {
            match self.dial(addr, index).await {
                Ok(stream) => {
                    tcp = Some(stream);
                    break;
                }
                Err(err) => last_error = Some(err),
            }
        }
        let Some(tcp) = tcp else {
            return Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no address to connect to")));
        };
        let mut request = url.into_client_request()?;
        if let Some(token) = &self.token {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {token}").parse()?);
        }
        let (mut ws, _) =
            tokio_tungstenite::client_async_with_config(request, tcp, Some(self.config)).await?;
        if !self.raw {
            let welcome = next_frame(&mut ws).await?;
            if welcome.opcode != opcode::WELCOME {
                bail!("expected WELCOME, got opcode {}", welcome.opcode);
            }
        }
        Ok(ws)
    }

    /// A TCP connection to `addr`, from this connection's source address.
    async fn dial(&self, addr: SocketAddr, index: usize) -> anyhow::Result<TcpStream> {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        let source = (!self.sources.is_empty()).then(|| self.sources[index % self.sources.len()]);
        if let Some(source) = source.filter(|s| s.is_ipv4() == addr.is_ipv4()) {
            socket
                .bind(SocketAddr::new(source, 0))
                .with_context(|| format!("cannot bind source address {source}"))?;
        }
        let tcp = socket
            .connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }
}

/// The next binary message of `ws` as a frame.
pub(super) async fn next_frame(ws: &mut Ws) -> anyhow::Result<Frame> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .context("no frame from the server within 10 s")?
            .context("connection closed")??;
        match message {
            Message::Binary(bytes) => return Ok(Frame::decode(bytes)?),
            Message::Close(close) => bail!("closed by the server: {close:?}"),
            _ => continue,
        }
    }
}

/// Opens `n` connections with `open`, at most `ramp` a second, and returns
/// those that opened, with the first error when some did not.
pub(super) async fn connect_all<T, F, Fut>(
    n: usize,
    ramp: u32,
    open: F,
) -> (Vec<T>, usize, Option<anyhow::Error>)
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let progress = Progress::new("connecting");
    let at_once = Arc::new(Semaphore::new(CONNECTING_AT_ONCE));
    // Starts are paced in steps of at least 10 ms (the timer's resolution
    // is 1 ms): `per_step` connections every `period`.
    let per_step = (ramp as usize).div_ceil(100);
    let period = Duration::from_secs_f64(per_step as f64 / f64::from(ramp));
    let mut step = tokio::time::interval(period);
    step.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut attempts = Vec::with_capacity(n);
    for index in 0..n {
        if index % per_step == 0 {
            step.tick().await;
        }
        let permit = at_once.clone().acquire_owned().await.expect("never closed");
        let attempt = open(index);
        attempts.push(tokio::spawn(async move {
            let result = attempt.await;
            drop(permit);
            result
        }));
        progress.show(format_args!("{}/{n}", index + 1));
    }
    let (mut opened, mut failed, mut first_error) = (Vec::with_capacity(n), 0, None);
    for attempt in attempts {
        match attempt.await {
            Ok(Ok(connection)) => opened.push(connection),
            Ok(Err(err)) => {
                failed += 1;
                first_error.get_or_insert(err);
            }
            Err(err) => {
                failed += 1;
                first_error.get_or_insert(err.into());
            }
        }
    }
    progress.done();
    (opened, failed, first_error)
}

/// Fails when nothing connected, and warns (on stderr) when some did not.
pub(super) fn check_connected(
    wanted: usize,
    opened: usize,
    first_error: Option<anyhow::Error>,
) -> anyhow::Result<()> {
    match first_error {
        Some(err) if opened == 0 => Err(err.context("no connection opened")),
        Some(err) => {
            eprintln!(
                "warning: {} of {wanted} connections failed; first: {err:#}",
                wanted - opened
            );
            Ok(())
        }
        None => Ok(()),
    }
}

/// system choose, or 127.0.0.1..=127.0.0.N past what one address pair's
/// ephemeral ports allow.
pub(super) fn source_addresses(
    server: SocketAddr,
    conns: usize,
    wanted: Option<u8>,
) -> Vec<IpAddr> {
    let needed = wanted.map_or(conns.div_ceil(CONNECTIONS_PER_SOURCE), usize::from);
    if needed <= 1 || !server.ip().is_loopback() || !server.is_ipv4() {
        return Vec::new();
    }
    (1..=needed.min(254) as u8)
        .map(|last| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
        .collect()
}
