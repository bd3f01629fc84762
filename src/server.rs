//! The server: accept loop, HTTP routes, WebSocket upgrades and graceful
//! shutdown.
//!
//! Routes: the opcode protocol at [`Config::ws_path`] (`/ws`), a plain
//! echo WebSocket at `/echo` (for diagnostics and conformance suites), and
//! `GET /healthz`.

use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    extract::{Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{any, get, post},
    Extension, Json,
};
use futures_util::{SinkExt, StreamExt};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::{
    tungstenite::protocol::{Role, WebSocketConfig},
    WebSocketStream,
};
use tokio_util::task::TaskTracker;
use tower_service::Service;
use tracing::{debug, info, warn};

use crate::{
    api,
    auth::{AuthConfigError, AuthError, Authenticator},
    broker::{Broker, BrokerStatus, HistoryPolicies, MemoryBroker, RedisBroker, RedisSettings},
    close::{self, CloseReason},
    config::{BrokerChoice, ListenAddr},
    connection,
    deadline::Drain,
    handlers,
    hub::HubConfig,
    identity::Identity,
    inflight::AckSettings,
    limit::{AddressLimit, AddressPermit},
    metrics::{self, CounterSnapshot},
    node::Node,
    origin::OriginPolicy,
    proxy::{self, TrustedProxies},
    queue::SessionQueue,
    read_ahead::ReadAhead,
    session::Session,
    signal::Signal,
    stream::{self, SessionStream},
    tls,
    topic::Topic,
    upgrade::{self, UpgradeError},
    web, Config, Hub, Router,
};

/// Outgoing bytes the codec buffers before a write is forced. A session's
/// frames go around the codec (`Socket::write_batch`) on a stream with
/// vectored writes; through it otherwise, flushed per batch anyway, so this
/// only has to hold a typical batch: at 16 KiB a fan-out's batch of 64
/// deliveries (325 B each with 256 B of data) went out in two `sendto`
/// calls, and on loopback the call, not the bytes, is most of a delivery's
/// cost. Not more: the codec keeps the buffer's capacity for as long as the
/// session lives.
const WRITE_BUFFER: usize = 32 * 1024;

/// An upgraded connection's stream, read through [`ReadAhead`].
type Upgraded = ReadAhead<SessionStream>;

/// Why a server cannot start: a setting to fix, or an address that cannot
/// be bound. Each says what to do in one line, so a binary can print it as
/// it is; `wsproto-server` exits 2 for [`ServerError::Config`] (like any
/// other usage error) and 1 for [`ServerError::Bind`].
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A setting is unusable; `flag` names its command-line flag and the
    /// message says what is wrong and how to fix it.
    #[error("{flag}: {message}")]
    Config {
        /// The flag of the setting, e.g. `--jwt-secret`.
        flag: &'static str,
        /// What is wrong with it and what to do instead.
        message: String,
    },
    /// The listen address could not be bound: in use, not permitted, or it
    /// does not resolve. A problem of the machine rather than of the
    /// settings, so it may go away on its own.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address as configured (`--listen`).
        addr: String,
        /// What the system said.
        source: io::Error,
    },
}

impl ServerError {
    fn config(flag: &'static str, message: impl Into<String>) -> ServerError {
        ServerError::Config {
            flag,
            message: message.into(),
        }
    }
}

/// For callers whose errors are `io::Error` (`?` in a function returning
/// `io::Result`): a bind failure keeps the system's error kind, a setting
/// becomes [`io::ErrorKind::InvalidInput`].
impl From<ServerError> for io::Error {
    fn from(err: ServerError) -> io::Error {
        let kind = match &err {
            ServerError::Config { .. } => io::ErrorKind::InvalidInput,
            ServerError::Bind { source, .. } => source.kind(),
        };
        io::Error::new(kind, err)
    }
}

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    listeners: Listeners,
    state: AppState,
}

#[derive(Clone)]
struct AppState {
    config: Arc<Config>,
    router: Arc<Router>,
    /// This node: its hub of sessions, its broker and its counters.
    node: Node,
    /// One permit per open WebSocket, so upgrades past the cap are refused.
    connections: Arc<Semaphore>,
    /// One permit per connection not yet upgraded, taken before `accept`.
    handshakes: Arc<Semaphore>,
    /// The same per client address, taken after `accept`.
    handshakes_per_address: AddressLimit,
    /// One permit per connection being answered by [`refuse_connection`].
    refusals: Arc<Semaphore>,
    /// Peers allowed to name the client (--trusted-proxy).
    proxies: Arc<TrustedProxies>,
    per_address: AddressLimit,
    origins: OriginPolicy,
    /// Verifies tokens at upgrade; `None` in insecure mode.
    auth: Option<Arc<Authenticator>>,
    /// Terminates TLS when a certificate is configured.
    tls: Option<TlsAcceptor>,
    shutdown: Signal,
    /// Closes this server's sessions a few at a time once it shuts down.
    drain: Drain,
    /// Fired when the shutdown deadline passes: sessions still open end at once.
    abort: Signal,
    tasks: TaskTracker,
    ws_config: WebSocketConfig,
}

/// The client's address, attached to each request by the accept loop.
#[derive(Debug, Clone, Copy)]
struct PeerAddr(SocketAddr);

impl Server {
    /// Binds `config.listen` and prepares to serve `router`. In insecure
    /// mode the listener is kept to loopback unless
    /// `config.insecure_allow_remote` says otherwise: anyone who can reach
    /// it may claim any user id.
    ///
    /// # Errors
    /// [`ServerError::Bind`] when the address cannot be bound;
    /// [`ServerError::Config`] when it is not loopback in insecure mode, or
    /// as [`Server::from_listener`].
    pub async fn bind(config: Config, router: Router) -> Result<Server, ServerError> {
        let bound = match config.is_insecure() && !config.insecure_allow_remote {
            true => config.listen.bind_loopback(config.listen_backlog).await,
            false => config.listen.bind(config.listen_backlog).await,
        };
        let listener = bound.map_err(|source| {
            // bind_loopback's own refusal of a non-loopback address (not
            // an error of the system, so it has no OS error number) is a
            // setting to change; its message names the fix.
            let refused =
                source.kind() == io::ErrorKind::PermissionDenied && source.raw_os_error().is_none();
            match refused {
                true => ServerError::config("--listen", source.to_string()),
                false => ServerError::Bind {
                    addr: config.listen.to_string(),
                    source,
                },
            }
        })?;
        // Insecure mode on `:PORT` serves loopback: IPv6's too, so that
        // `localhost` works wherever it resolves to ::1 first. Skipped
        // where the machine has no IPv6 loopback.
        let also_ipv6 = match (&config.listen, listener.local_addr()) {
            (ListenAddr::AnyInterface(_), Ok(v4))
                if config.is_insecure() && !config.insecure_allow_remote =>
            {
                let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, v4.port()));
                match ListenAddr::Socket(v6).bind(config.listen_backlog).await {
                    Ok(listener) => Some(listener),
                    Err(err) => {
                        debug!(%err, "not listening on {v6}");
                        None
                    }
                }
            }
            _ => None,
        };
        let mut server = Server::from_listener(listener, config, router)?;
        server.listeners.0.extend(also_ipv6);
        Ok(server)
    }

    /// Serves `router` on an already-bound listener (`config.listen` is
    /// ignored); what tests use with port 0.
    ///
    /// # Errors
    /// [`ServerError::Config`] naming the setting, when a timeout is zero,
    /// `config.ws_path` collides with a built-in route, or the JWT or TLS
    /// settings are unusable.
    pub fn from_listener(
        listener: TcpListener,
        config: Config,
        router: Router,
    ) -> Result<Server, ServerError> {
        let durations = [
            ("--ping-interval", config.ping_interval),
            ("--ping-timeout", config.ping_timeout),
            ("--write-timeout", config.write_timeout),
            ("--shutdown-timeout", config.shutdown_timeout),
            ("--handshake-timeout", config.handshake_timeout),
        ];
        if let Some((flag, _)) = durations.iter().find(|(_, d)| d.is_zero()) {
            return Err(ServerError::config(
                flag,
                "must be more than zero, e.g. 10s",
            ));
        }
        if matches!(
            config.ws_path.as_str(),
            "/" | "/echo"
                | "/healthz"
                | "/metrics"
                | "/api/publish"
                | "/api/history"
                | "/demo.js"
                | "/wsproto.js"
        ) {
            return Err(ServerError::config(
                "--ws-path",
                format!(
                    "{} is a built-in route; choose another path, e.g. /ws",
                    config.ws_path
                ),
            ));
        }
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(config.read_buffer)
            .write_buffer_size(WRITE_BUFFER)
            .max_message_size(Some(config.max_message_size))
            .max_frame_size(Some(config.max_message_size));
        let hub_config = hub_config(&config);
        let auth = Authenticator::from_settings(&config.auth())
            .map_err(|err| {
                let (flag, message) = match &err {
                    AuthConfigError::Read { .. } | AuthConfigError::NotAPublicKey { .. } => (
                        "--jwt-public-key",
                        format!("{err}; give the path of an EC or RSA public key in PEM form"),
                    ),
                    AuthConfigError::BothKeys => (
                        "--jwt-secret",
                        "cannot be combined with --jwt-public-key; give one of the two".into(),
                    ),
                    AuthConfigError::EmptySecret => (
                        "--jwt-secret",
                        "is empty, so anyone could sign tokens; give a long random secret, \
                         or leave the flag out for insecure mode"
                            .into(),
                    ),
                };
                ServerError::config(flag, message)
            })?
            .map(Arc::new);
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(TlsAcceptor::from(
                tls::server_config(cert, key).map_err(|err| {
                    let (flag, fix) = match &err {
                        tls::TlsError::Key { .. } => {
                            ("--tls-key", "give the PEM private key of --tls-cert")
                        }
                        tls::TlsError::Config(_) => (
                            "--tls-cert",
                            "give a certificate chain and the private key that belongs to it",
                        ),
                        tls::TlsError::Certificates { .. } | tls::TlsError::HalfConfigured => {
                            ("--tls-cert", "give a PEM certificate chain file")
                        }
                    };
                    ServerError::config(flag, format!("{err}; {fix}"))
                })?,
            )),
            (None, None) => None,
            _ => {
                let err = tls::TlsError::HalfConfigured;
                return Err(ServerError::config("--tls-cert", err.to_string()));
            }
        };
        let origins = OriginPolicy::new(config.allowed_origins.clone());
        if origins.allows_any() {
            warn!("--allowed-origin '*': any web page may open WebSockets to this server");
        }
        let node = node(&config, hub_config)?;
        let state = AppState {
            connections: Arc::new(Semaphore::new(config.max_connections)),
            handshakes: Arc::new(Semaphore::new(config.max_handshakes as usize)),
            handshakes_per_address: AddressLimit::new(config.max_handshakes_per_ip as usize),
            refusals: Arc::new(Semaphore::new(
                REFUSALS_PER_HANDSHAKE * config.max_handshakes as usize,
            )),
            proxies: Arc::new(TrustedProxies::new(config.trusted_proxies.clone())),
            per_address: AddressLimit::new(config.max_connections_per_ip),
            origins,
            auth,
            tls,
            config: Arc::new(config),
            router: Arc::new(handlers::with_protocol(router)),
            node,
            shutdown: Signal::new(),
            drain: Drain::new(),
            abort: Signal::new(),
            tasks: TaskTracker::new(),
            ws_config,
        };
        let listeners = Listeners(vec![listener]);
        Ok(Server { listeners, state })
    }

    /// The address the server listens on (the first, when insecure mode
    /// serves both IPv4 and IPv6 loopback).
    ///
    /// # Errors
    /// As [`TcpListener::local_addr`].
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listeners.0[0].local_addr()
    }

    /// Every address the server listens on.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        let addrs = self.listeners.0.iter().map(TcpListener::local_addr);
        addrs.filter_map(Result::ok).collect()
    }

    /// Publishes through `broker` instead of the default in-process
    /// [`MemoryBroker`]: several servers sharing a broker act as one
    /// deployment. Call before [`run`](Server::run).
    pub fn with_broker(mut self, broker: Arc<dyn Broker>) -> Server {
        let config = &self.state.config;
        // A broker that names the node (Redis: its inbox) decides its id.
        let id = broker
            .node_id()
            .unwrap_or_else(|| self.state.node.id().into());
        self.state.node = Node::with_id(id, hub_config(config), broker);
        self
    }

    /// This server's node: its hub, broker and counters.
    pub fn node(&self) -> Node {
        self.state.node.clone()
    }

    /// This server's hub of sessions.
    pub fn hub(&self) -> Hub {
        self.state.node.hub().clone()
    }

    /// Serves until `shutdown` completes, then stops accepting, sends Close
    /// 1001 to every session and waits for them to finish; after
    /// [`Config::shutdown_timeout`] (plus a second for the last writes) the
    /// connections still open are cut.
    ///
    /// Accept errors (such as running out of file descriptors) are logged
    /// and retried after a pause; they never end the loop.
    ///
    /// # Errors
    /// None at present; the signature leaves room for fatal listener errors.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let Server {
            listeners: listener,
            state,
        } = self;
        let app = axum::Router::new()
            // any(): the upgrade itself answers a non-GET with 405 and a reason.
            .route(&state.config.ws_path, any(protocol_endpoint))
            .route("/echo", any(echo_endpoint))
            .route("/healthz", get(healthz))
            .route("/metrics", get(prometheus_metrics))
            .route("/api/publish", post(publish_endpoint))
            .route("/api/history", post(history_endpoint))
            .merge(web::routes())
            .with_state(state.clone());
        if state.auth.is_none() {
            let reach = match state.config.insecure_allow_remote {
                true => "open to the network (--insecure-allow-remote)",
                false => "loopback only",
            };
            warn!("insecure mode, {reach}: no --jwt-secret or --jwt-public-key, so user ids come unchecked from the connect URL (?user=); for local development only");
        }
        match state.config.api_key {
            Some(_) => info!("publish API enabled at POST /api/publish"),
            None => info!("publish API is off: no --api-key configured"),
        }

        if state.tls.is_some() {
            info!("serving wss:// (TLS)");
        }
        tokio::pin!(shutdown);
        loop {
            // Held until the connection upgrades or ends: past the cap, new
            // connections wait in the kernel's backlog instead of costing a
            // task and a descriptor each.
            let handshake = match state.handshakes.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    metrics::bump(&state.node.counters().handshakes_full);
                    tokio::select! {
                        biased;
                        _ = &mut shutdown => break,
                        permit = state.handshakes.clone().acquire_owned() => match permit {
                            Ok(permit) => permit,
                            Err(_) => break,
                        },
                    }
                }
            };
            let (tcp, peer) = tokio::select! {
                biased;
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        warn!(%err, "accept failed; retrying shortly");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            // A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d.
            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
            // A trusted proxy carries many clients: its own address is not
            // limited; theirs are, once known.
            let from_proxy = state.proxies.trusts(peer.ip());
            let (tcp, handshake_from_address) = match from_proxy {
                true => (tcp, None),
                false => match admit_address(&state, tcp, peer) {
                    Some((tcp, permit)) => (tcp, Some(permit)),
                    None => continue,
                },
            };
            let (app, state_for_task) = (app.clone(), state.clone());
            let tls = state.tls.clone();
            state.tasks.spawn(async move {
                let state = state_for_task;
                let (tcp, peer, handshake_from_address, proxies) = match handshake_from_address {
                    Some(permit) => (tcp, peer, Some(permit), None),
                    None if state.config.proxy_protocol => {
                        let Some((tcp, client)) = read_proxy_header(&state, tcp, peer).await else {
                            return;
                        };
                        let Some((tcp, permit)) = admit_address(&state, tcp, client) else {
                            return;
                        };
                        (tcp, client, Some(permit), None)
                    }
                    // The client address comes with each request's headers.
                    None => (tcp, peer, None, Some(state.proxies.clone())),
                };
                let _handshake = (handshake, handshake_from_address);
                let Some(tls) = tls else {
                    return serve_http(state, app, tcp, peer, proxies).await;
                };
                // The TLS handshake counts against the handshake timeout too.
                let timeout = state.config.handshake_timeout;
                match tokio::time::timeout(timeout, tls.accept(tcp)).await {
                    Ok(Ok(stream)) => serve_http(state, app, stream, peer, proxies).await,
                    Ok(Err(err)) => debug!(%peer, %err, "TLS handshake failed"),
                    Err(_) => {
                        metrics::bump(&state.node.counters().closed_handshake_timeout);
                        debug!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }

        let open = state.node.hub().len();
        info!(sessions = open, "shutting down: closing sessions with 1001");
        state.shutdown.fire();
        // Spread over the first half of the shutdown timeout, leaving the
        // second for the clients' answers.
        state.drain.begin(state.config.shutdown_timeout / 2);
        state.tasks.close();
        let drain = async {
            // Sessions give clients shutdown_timeout to answer; allow a little
            // more for the last writes before giving up on them.
            let deadline = state.config.shutdown_timeout + Duration::from_secs(1);
            if tokio::time::timeout(deadline, state.tasks.wait())
                .await
                .is_err()
            {
                warn!(
                    sessions = state.node.hub().len(),
                    "shutdown deadline passed; closing remaining connections"
                );
                state.abort.fire();
                let _ = tokio::time::timeout(Duration::from_secs(1), state.tasks.wait()).await;
            }
        };
        // Until the listener closes, connections get 503 and Retry-After
        // (and a reconnecting client moves on) instead of ECONNREFUSED.
        let turn_away = async {
            loop {
                match listener.accept().await {
                    Ok((tcp, peer)) => {
                        metrics::bump(&state.node.counters().refused_capacity);
                        refuse_connection(&state, tcp, peer, Refusal::ShuttingDown);
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        };
        tokio::select! {
            _ = drain => {}
            _ = turn_away => {}
        }
        drop(listener);
        info!("shutdown complete");
        Ok(())
    }
}

/// The sockets a server accepts on: one, or IPv4 and IPv6 loopback.
struct Listeners(Vec<TcpListener>);

impl Listeners {
    /// The next connection on any of them.
    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        std::future::poll_fn(|cx| {
            for listener in &self.0 {
                if let std::task::Poll::Ready(accepted) = listener.poll_accept(cx) {
                    return std::task::Poll::Ready(accepted);
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}

/// Takes a handshake slot of `client`'s address for `tcp`, or answers it
/// 429 (and returns `None`) when the address has none left.
fn admit_address(
    state: &AppState,
    tcp: TcpStream,
    client: SocketAddr,
) -> Option<(TcpStream, AddressPermit)> {
    match state.handshakes_per_address.try_acquire(client.ip()) {
        Some(permit) => Some((tcp, permit)),
        None => {
            metrics::bump(&state.node.counters().refused_handshakes_per_address);
            debug!(peer = %client, "too many connections not yet upgraded from this address; 429");
            refuse_connection(state, tcp, client, Refusal::TooManyHandshakes);
            None
        }
    }
}

/// The client address a trusted load balancer's PROXY protocol header
/// names, or `None` when it sends none in time (dropped, counted as a
/// handshake timeout) or a malformed one (answered 400: the load balancer
/// is misconfigured, and whoever reads the answer should learn why).
async fn read_proxy_header(
    state: &AppState,
    mut tcp: TcpStream,
    peer: SocketAddr,
) -> Option<(TcpStream, SocketAddr)> {
    let header = proxy::read_proxy_header(&mut tcp, peer);
    match tokio::time::timeout(state.config.handshake_timeout, header).await {
        Ok(Ok(client)) => Some((tcp, client)),
        Ok(Err(err)) => {
            debug!(%peer, %err, "PROXY protocol header refused; 400");
            refuse_connection(state, tcp, peer, Refusal::BadProxyHeader);
            None
        }
        Err(_) => {
            metrics::bump(&state.node.counters().closed_handshake_timeout);
            debug!(%peer, "no PROXY protocol header in time");
            None
        }
    }
}

/// Why a connection is answered before its request is even read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Its address already has --max-handshakes-per-ip connections not yet upgraded.
    TooManyHandshakes,
    /// The server is shutting down.
    ShuttingDown,
    /// A trusted load balancer sent no PROXY protocol header, or a malformed one.
    BadProxyHeader,
}

impl Refusal {
    /// The whole HTTP response: status, `Retry-After` and a one-line reason.
    fn response(self) -> Vec<u8> {
        let (status, retry_after, reason) = match self {
            Refusal::TooManyHandshakes => (
                StatusCode::TOO_MANY_REQUESTS,
                Some(upgrade::RETRY_AFTER_BUSY),
                "too many connections being opened from this address; retry later",
            ),
            Refusal::ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                Some(upgrade::RETRY_AFTER_UNAVAILABLE),
                "server is shutting down; retry later or elsewhere",
            ),
            Refusal::BadProxyHeader => (
                StatusCode::BAD_REQUEST,
                None,
                "expected a PROXY protocol header (v1 or v2) from this load balancer",
            ),
        };
        let retry_after =
            retry_after.map_or(String::new(), |secs| format!("Retry-After: {secs}\r\n"));
        format!(
            "HTTP/1.1 {status}\r\n{retry_after}Content-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{reason}\n",
            reason.len() + 1
        )
        .into_bytes()
    }
}

/// Refusals in flight per allowed handshake (see [`refuse_connection`]):
/// each is a small task and a socket for at most a few seconds.
const REFUSALS_PER_HANDSHAKE: usize = 4;

/// How long a refused connection may take to receive its answer (and, with
/// TLS, to complete the TLS handshake first).
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);

/// Answers a connection refused before HTTP with a fixed response and
/// closes it gracefully, in a task of its own: a client gets a status it
/// can act on (and a `Retry-After`) instead of a bare FIN or reset.
///
/// At most [`REFUSALS_PER_HANDSHAKE`] × `--max-handshakes` refusals are in
/// flight (a reconnect storm from one address is mostly refusals, each
/// lingering until the client has read it); past that a connection gets
/// its answer written at once, without a task or a wait ([`answer_now`]),
/// so a flood cannot turn refusals into unbounded work.
fn refuse_connection(state: &AppState, tcp: TcpStream, peer: SocketAddr, why: Refusal) {
    let Ok(permit) = state.refusals.clone().try_acquire_owned() else {
        if state.tls.is_none() && answer_now(&tcp, &why.response()) {
            metrics::bump(&state.node.counters().refusals_answered_at_once);
            debug!(%peer, ?why, "too many refusals in flight; answered at once");
        } else {
            debug!(%peer, ?why, "too many refusals in flight; dropped unanswered");
        }
        return;
    };
    let tls = state.tls.clone();
    // Not tracked with the sessions: refusals during shutdown must not
    // hold it up, and each ends on its own within a few seconds.
    tokio::spawn(async move {
        let _permit = permit;
        let response = why.response();
        let answer = async {
            match tls {
                None => answer_and_close(tcp, &response).await,
                Some(tls) => {
                    if let Ok(stream) = tls.accept(tcp).await {
                        answer_and_close(stream, &response).await;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(REFUSAL_TIMEOUT + close::LINGER, answer).await;
    });
}

/// Best effort, for when refusals are already at their bound: writes
/// `response` if the socket takes it at once (a fresh socket's send buffer
/// is empty, so it nearly always does) and reads away the request if it
/// has already arrived, so that closing sends a FIN rather than a reset
/// that would destroy the answer. A request still on its way is lost with
/// the socket; that client sees a reset. Returns whether the whole answer
/// was written.
///
/// Straight to the socket: tokio's `try_write` would first wait for the
/// reactor to have seen the fresh socket writable.
fn answer_now(tcp: &TcpStream, response: &[u8]) -> bool {
    use std::io::Read;
    let socket = socket2::SockRef::from(tcp);
    if socket.send(response).ok() != Some(response.len()) {
        return false;
    }
    let mut sink = [0u8; 4096];
    while matches!((&*socket).read(&mut sink), Ok(n) if n > 0) {}
    true
}

/// Writes `response` and closes without a reset: the request the client
/// has sent meanwhile is drained, not left unread.
async fn answer_and_close<IO>(mut io: IO, response: &[u8])
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    if let Ok(Ok(())) = tokio::time::timeout(REFUSAL_TIMEOUT, io.write_all(response)).await {
        close::linger(&mut io, REFUSAL_TIMEOUT).await;
    }
}

/// The node `config` asks for, with its broker.
fn node(config: &Config, hub_config: HubConfig) -> Result<Node, ServerError> {
    let id: Arc<str> = match &config.node_id {
        Some(id) => id.as_str().into(),
        None => Node::generated_id().into(),
    };
    let history = HistoryPolicies {
        patterns: config.history.clone(),
        user: config.user_history,
    };
    let broker: Arc<dyn Broker> = match &config.broker {
        BrokerChoice::Memory => Arc::new(MemoryBroker::with_history(history.clone())),
        BrokerChoice::Redis(url) => {
            let mut settings = RedisSettings::new(url.clone(), id.clone());
            settings.prefix = config.redis_prefix.clone();
            settings.history = history.clone();
            let broker = RedisBroker::new(settings)
                .map_err(|e| ServerError::config("--broker", e.to_string()))?;
            info!(node = %id, %url, "cluster mode: publishing through Redis");
            Arc::new(broker)
        }
    };
    Ok(Node::with_id(id, hub_config, broker))
}

/// The hub settings `config` asks for.
fn hub_config(config: &Config) -> HubConfig {
    HubConfig {
        policies: config.topic_policies.clone(),
        max_subscriptions: config.max_subscriptions,
        max_rooms: config.max_rooms,
    }
}

/// Serves HTTP on one connection (plain or TLS) until it upgrades or ends.
///
/// A connection is plain HTTP until it upgrades (the future then
/// completes); as such it gets `handshake_timeout` in all, so slowloris
/// clients and idle keep-alives cannot pile up.
///
/// With `proxies`, each request's client address is what a trusted proxy
/// says it is (see [`TrustedProxies::client_addr`]); otherwise `peer`.
async fn serve_http<IO>(
    state: AppState,
    app: axum::Router,
    io: IO,
    peer: SocketAddr,
    proxies: Option<Arc<TrustedProxies>>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        let client = match &proxies {
            Some(proxies) => proxies.client_addr(peer, request.headers()),
            None => peer,
        };
        request.extensions_mut().insert(PeerAddr(client));
        let publishing =
            request.method() == http::Method::POST && request.uri().path().starts_with("/api/");
        let response = app.clone().call(request);
        async move {
            let mut response = response.await?;
            // No keep-alive: an idle HTTP connection would hold this
            // address's handshake slots until the handshake timeout. Only a
            // backend that published with the API key keeps its connection
            // (for --handshake-timeout), since publishing one message per
            // connection would cost it a TCP handshake and a TIME_WAIT each.
            let status = response.status();
            let keep =
                status == StatusCode::SWITCHING_PROTOCOLS || (publishing && status.is_success());
            if !keep {
                response.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        // Past it hyper answers 431 and closes.
        .max_header_size(state.config.max_request_head as usize)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = state.shutdown.fired() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
        _ = tokio::time::sleep(state.config.handshake_timeout) => {
            metrics::bump(&state.node.counters().closed_handshake_timeout);
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(Duration::from_secs(1), connection).await {
                Ok(result) => result,
                Err(_) => return debug!(%peer, "handshake timed out"),
            }
        }
    };
    if let Err(err) = result {
        debug!(%peer, %err, "http connection ended with an error");
    }
}

/// Checks that a session may start, and spawns `serve` on the upgraded
/// connection once the 101 response has gone out.
fn upgrade_then<F, Fut>(state: &AppState, mut request: Request, serve: F) -> Response
where
    F: FnOnce(Upgraded) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let (response, on_upgrade) = match upgrade::accept(&mut request) {
        Ok(accepted) => accepted,
        Err(err) => return err.into_response(),
    };
    let headers = request.headers();
    let origin = headers.get(http::header::ORIGIN).map(|v| v.as_bytes());
    let host = headers.get(http::header::HOST).map(|v| v.as_bytes());
    if let Err(err) = state.origins.check(origin, host) {
        debug!(%err, "upgrade refused");
        metrics::bump(&state.node.counters().refused_origin);
        return UpgradeError::OriginNotAllowed.into_response();
    }
    if state.shutdown.is_fired() {
        metrics::bump(&state.node.counters().refused_capacity);
        return UpgradeError::Unavailable.into_response();
    }
    let Some(PeerAddr(peer)) = request.extensions().get::<PeerAddr>().copied() else {
        return UpgradeError::NotUpgradable.into_response();
    };
    let Some(address_permit) = state.per_address.try_acquire(peer.ip()) else {
        debug!(%peer, "per-address connection limit reached; upgrade refused");
        metrics::bump(&state.node.counters().refused_per_address);
        return UpgradeError::TooManyFromAddress.into_response();
    };
    let Ok(permit) = state.connections.clone().try_acquire_owned() else {
        debug!("connection limit reached; upgrade refused");
        metrics::bump(&state.node.counters().refused_capacity);
        return UpgradeError::Unavailable.into_response();
    };
    let abort = state.abort.clone();
    // Made outside the task's future and boxed: what a task's future
    // captures stays in it for the session's whole life, and this runs
    // once. The session's own future is boxed too: moved into the select
    // below it would be stored twice.
    let opening = Box::pin(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(err) => {
                debug!(%err, "upgrade failed");
                return Err(());
            }
        };
        Ok(Box::pin(serve(stream::upgraded(upgraded))))
    });
    state.tasks.spawn(async move {
        if let Ok(session) = opening.await {
            tokio::select! {
                _ = session => {}
                _ = abort.fired() => {}
            }
        }
        drop((permit, address_permit));
    });
    response
}

/// What the connect URL asks for:
/// `?user=ID&device=ID&subscribe=TOPIC&subscribe=…`.
struct ConnectParams {
    user_id: Option<Arc<str>>,
    subscriptions: Vec<Topic>,
    device: Option<Arc<str>>,
}

/// Longest user id accepted from the connect URL.
const MAX_USER_ID_LEN: usize = 64;

impl ConnectParams {
    fn parse(query: Option<&str>) -> Result<ConnectParams, String> {
        let mut params = ConnectParams {
            user_id: None,
            subscriptions: Vec::new(),
            device: None,
        };
        for pair in query.unwrap_or_default().split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            // Lossy decoding would map %ff and %fe both to U+FFFD, so two
            // different ids would be one user: invalid UTF-8 is refused.
            let (Some(key), Some(value)) =
                (decode_query_component(key), decode_query_component(value))
            else {
                return Err("the query is not percent-encoded UTF-8".into());
            };
            match &*key {
                "user" => {
                    let valid = !value.is_empty()
                        && value.len() <= MAX_USER_ID_LEN
                        && !value.chars().any(|c| c.is_control() || c.is_whitespace());
                    if !valid {
                        return Err(format!(
                            "user must be 1 to {MAX_USER_ID_LEN} bytes without spaces"
                        ));
                    }
                    params.user_id = Some(value.as_ref().into());
                }
                "device" => {
                    let valid = !value.is_empty()
                        && value.len() <= MAX_USER_ID_LEN
                        && value
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
                    if !valid {
                        return Err(format!(
                            "device must be 1 to {MAX_USER_ID_LEN} letters, digits or ._:-"
                        ));
                    }
                    params.device = Some(value.as_ref().into());
                }
                "subscribe" => {
                    let topic = Topic::parse(&value).map_err(|e| format!("subscribe: {e}"))?;
                    if !params.subscriptions.contains(&topic) {
                        params.subscriptions.push(topic);
                    }
                }
                _ => {}
            }
        }
        Ok(params)
    }
}

/// One `application/x-www-form-urlencoded` name or value, decoded: `+` is
/// a space and `%XX` a byte. `None` when the bytes are not UTF-8 (a `%`
/// not followed by two hex digits stays as it is, as browsers do).
fn decode_query_component(raw: &str) -> Option<std::borrow::Cow<'_, str>> {
    if !raw.contains(['%', '+']) {
        return Some(raw.into());
    }
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |at: usize| bytes.get(at).and_then(|b| (*b as char).to_digit(16));
        match bytes[i] {
            b'+' => decoded.push(b' '),
            b'%' => match (hex(i + 1), hex(i + 2)) {
                (Some(high), Some(low)) => {
                    decoded.push((high * 16 + low) as u8);
                    i += 2;
                }
                _ => decoded.push(b'%'),
            },
            byte => decoded.push(byte),
        }
        i += 1;
    }
    String::from_utf8(decoded).ok().map(Into::into)
}

/// The verified identity of an upgrade request, `None` in insecure mode,
/// or why it is refused (logged and counted; answered with 401).
fn authenticate(state: &AppState, request: &Request) -> Result<Option<Identity>, AuthError> {
    let Some(auth) = &state.auth else {
        return Ok(None);
    };
    match auth.authenticate(request.headers(), request.uri().query()) {
        Ok(identity) => Ok(Some(identity)),
        Err(err) => {
            let peer = request.extensions().get::<PeerAddr>().map(|p| p.0);
            debug!(?peer, %err, "upgrade refused");
            metrics::bump(&state.node.counters().refused_auth);
            Err(err)
        }
    }
}

async fn protocol_endpoint(
    State(state): State<AppState>,
    Extension(PeerAddr(peer)): Extension<PeerAddr>,
    request: Request,
) -> Response {
    let params = match ConnectParams::parse(request.uri().query()) {
        Ok(params) => params,
        Err(reason) => return (StatusCode::BAD_REQUEST, format!("{reason}\n")).into_response(),
    };
    let identity = match authenticate(&state, &request) {
        Ok(Some(identity)) => identity,
        // Insecure mode: whoever connects is whoever the URL says.
        Ok(None) => Identity::insecure(params.user_id, state.config.client_publish.clone()),
        Err(refusal) => return refusal.into_response(),
    };
    if let Some(topic) = params
        .subscriptions
        .iter()
        .find(|t| !identity.may_subscribe(t))
    {
        return (
            StatusCode::FORBIDDEN,
            format!("not allowed to subscribe to {topic}\n"),
        )
            .into_response();
    }
    if params.subscriptions.len() > state.config.max_subscriptions {
        let reason = format!("at most {} subscriptions\n", state.config.max_subscriptions);
        return (StatusCode::BAD_REQUEST, reason).into_response();
    }
    let (node, router, config, drain, authenticator) = (
        state.node.clone(),
        state.router.clone(),
        state.config.clone(),
        state.drain,
        state.auth.clone(),
    );
    let ws_config = state.ws_config;
    upgrade_then(&state, request, move |stream| {
        let queue = SessionQueue::with_limits(config.send_queue, config.send_queue_bytes);
        if params.device.is_some() {
            queue.expect_acknowledgements(AckSettings {
                window: config.ack_window,
                timeout: config.ack_timeout,
            });
        }
        let session = Session::new(
            node,
            identity,
            authenticator,
            Some(peer),
            queue,
            params.device,
        );
        let socket = connection::Socket::new(stream, ws_config);
        connection::run(socket, session, params.subscriptions, router, config, drain)
    })
}

async fn publish_endpoint(State(state): State<AppState>, request: Request) -> Response {
    match api::publish(&state.node, state.config.api_key.as_deref(), request).await {
        Ok(published) => Json(published).into_response(),
        Err(err) => err.into_response(),
    }
}

async fn history_endpoint(State(state): State<AppState>, request: Request) -> Response {
    match api::history(&state.node, state.config.api_key.as_deref(), request).await {
        Ok(history) => Json(history).into_response(),
        Err(err) => err.into_response(),
    }
}

async fn echo_endpoint(State(state): State<AppState>, request: Request) -> Response {
    if let Err(refusal) = authenticate(&state, &request) {
        return refusal.into_response();
    }
    let (config, shutdown) = (state.config.clone(), state.shutdown.clone());
    let ws_config = state.ws_config;
    upgrade_then(&state, request, move |stream| async move {
        let ws = WebSocketStream::from_raw_socket(stream, Role::Server, Some(ws_config)).await;
        echo(ws, config, shutdown).await
    })
}

/// `/echo`: sends every text or binary message back unchanged. One task
/// reads and writes in turn, so there is still exactly one writer.
async fn echo(mut ws: WebSocketStream<Upgraded>, config: Arc<Config>, shutdown: Signal) {
    // Made once: it registers with the server-wide signal when first polled.
    let shutting_down = shutdown.fired();
    tokio::pin!(shutting_down);
    loop {
        let message = tokio::select! {
            _ = &mut shutting_down => {
                let _ = tokio::time::timeout(config.write_timeout, ws.close(Some(CloseReason::GOING_AWAY.frame()))).await;
                // Wait for the client's answering close.
                let _ = tokio::time::timeout(config.shutdown_timeout, async { while ws.next().await.is_some() {} }).await;
                return;
            }
            message = tokio::time::timeout(config.ping_timeout, ws.next()) => message,
        };
        match message {
            Ok(Some(Ok(message))) if message.is_text() || message.is_binary() => {
                match tokio::time::timeout(config.write_timeout, ws.send(message)).await {
                    Ok(Ok(())) => {}
                    _ => return,
                }
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(err))) => {
                let Some(reason) = CloseReason::for_read_error(&err) else {
                    return connection::flush_rest(&mut ws, config.write_timeout).await;
                };
                // Nothing more can be read (the rest of a broken or oversized
                // message may still be on the wire): say why, then drain so
                // the close is not lost to a reset.
                debug!(%err, code = reason.code, "closing /echo");
                let close = ws.close(Some(reason.frame()));
                let _ = tokio::time::timeout(config.write_timeout, close).await;
                return close::linger(ws.get_mut(), close::LINGER).await;
            }
            Ok(None) => {
                // The answer to a client's close may not be out yet.
                return connection::flush_rest(&mut ws, config.write_timeout).await;
            }
            Err(_idle) => {
                let close = ws.close(Some(CloseReason::HEARTBEAT_TIMEOUT.frame()));
                let _ = tokio::time::timeout(config.write_timeout, close).await;
                return;
            }
        }
    }
}

#[derive(serde::Serialize)]
struct Health {
    /// `ok`, or `degraded` while the broker cannot reach the other nodes
    /// (still 200: the node serves its own clients, so a load balancer
    /// should keep it).
    status: &'static str,
    node: String,
    sessions: usize,
    broker: BrokerStatus,
    /// How often each limit has tripped since start.
    limits: CounterSnapshot,
}

async fn healthz(State(state): State<AppState>) -> Json<Health> {
    let broker = state.node.broker().status();
    Json(Health {
        status: if broker.degraded { "degraded" } else { "ok" },
        node: state.node.id().to_owned(),
        sessions: state.node.hub().len(),
        broker,
        limits: state.node.counters().snapshot(),
    })
}

/// Counters and levels for Prometheus to scrape.
async fn prometheus_metrics(State(state): State<AppState>) -> Response {
    let broker = state.node.broker().status();
    let levels = metrics::Levels {
        sessions: state.node.hub().len(),
        handshakes: (state.config.max_handshakes as usize)
            .saturating_sub(state.handshakes.available_permits()),
        broker_degraded: broker.degraded,
        broker_counts: [
            (
                "wsproto_broker_local_only",
                "Publications delivered on this node only: the broker was unreachable",
                broker.local_only,
            ),
            (
                "wsproto_broker_failures",
                "Broker operations that failed",
                broker.failures,
            ),
            (
                "wsproto_broker_received",
                "Publications received from other nodes' broker",
                broker.received,
            ),
            (
                "wsproto_broker_unmatched",
                "Received publications that matched no session here",
                broker.unmatched,
            ),
            (
                "wsproto_broker_reconnects",
                "Reconnections of the broker's subscription",
                broker.reconnects,
            ),
        ],
    };
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.node.counters().prometheus(levels),
    )
        .into_response()
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM. The handlers are installed
/// when this is called, not when the future is first polled, so a signal
/// that arrives while the server is still starting is not lost (and does
/// not kill the process before its graceful shutdown).
///
/// # Panics
/// Outside a Tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let listen = |kind: SignalKind, name: &'static str| match signal(kind) {
            Ok(signal) => Some(signal),
            Err(err) => {
                warn!(%err, "cannot listen for {name}");
                None
            }
        };
        let interrupt = listen(SignalKind::interrupt(), "SIGINT");
        let terminate = listen(SignalKind::terminate(), "SIGTERM");
        async move {
            let wait = |signal: Option<tokio::signal::unix::Signal>| async move {
                match signal {
                    Some(mut signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wait(interrupt) => {},
                _ = wait(terminate) => {},
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            warn!(%err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    }
}
