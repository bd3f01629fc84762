//! Server settings: one struct, each field a `--flag` and a `WSPROTO_*`
//! environment variable, each with a safe default.

use std::{fmt, io, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use tokio::net::{lookup_host, TcpListener, TcpSocket};

use crate::{
    auth::AuthSettings, broker::HistoryPolicy, queue::DeliveryPolicy, recovery::MAX_REPLAY,
    topic::Topic,
};
/// The types of [`Config::allowed_origins`] and [`Config::trusted_proxies`],
/// and the errors of parsing them from their flags.
pub use crate::{
    origin::{OriginPattern, OriginPatternError},
    proxy::{Cidr, CidrError},
};

/// Every setting of a wsproto server. [`Config::default`] is what
/// `wsproto-server` runs with when given no flags.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct Config {
    /// Address to listen on: `:8080` (every interface; loopback only in
    /// insecure mode), `host:port` or `[v6]:port`.
    #[arg(
        long,
        env = "WSPROTO_LISTEN",
        default_value = ":8080",
        help_heading = "Connection"
    )]
    pub listen: ListenAddr,

    /// Accept unauthenticated clients from the network: without it, insecure
    /// mode (no JWT key) listens on loopback only and refuses a
    /// non-loopback --listen address.
    #[arg(
        long,
        env = "WSPROTO_INSECURE_ALLOW_REMOTE",
        help_heading = "Connection"
    )]
    pub insecure_allow_remote: bool,

    /// Length of the kernel's queue of connections not yet accepted; the
    /// kernel caps it at `net.core.somaxconn`. In a reconnect storm a short
    /// queue overflows, and clients wait for SYN retransmits (1 s, 3 s…).
    #[arg(long, env = "WSPROTO_LISTEN_BACKLOG", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Connection")]
    pub listen_backlog: u32,

    /// Reverse proxies and load balancers (`CIDR,...`, e.g.
    /// `127.0.0.1,10.0.0.0/8`) allowed to name the client: only from these
    /// peers is the client address taken from `Forwarded`,
    /// `X-Forwarded-For` (right-most untrusted hop) or `X-Real-IP`. Limits,
    /// logs and GET_INFO then use the real client address. Default: none.
    #[arg(
        long = "trusted-proxy",
        env = "WSPROTO_TRUSTED_PROXY",
        value_delimiter = ',',
        help_heading = "Connection"
    )]
    pub trusted_proxies: Vec<Cidr>,

    /// Connections from --trusted-proxy peers start with a PROXY protocol
    /// header (v1 or v2), as layer-4 load balancers send; the client
    /// address is taken from it instead of from HTTP headers.
    #[arg(
        long,
        env = "WSPROTO_PROXY_PROTOCOL",
        requires = "trusted_proxies",
        help_heading = "Connection"
    )]
    pub proxy_protocol: bool,

    /// URL path of the opcode-protocol WebSocket endpoint.
    #[arg(long, env = "WSPROTO_WS_PATH", default_value = "/ws", value_parser = parse_path, help_heading = "Connection")]
    pub ws_path: String,

    /// Largest message a client may send, in bytes (opcode word included);
    /// larger ones are refused with close code 1009 before being buffered.
    #[arg(long, env = "WSPROTO_MAX_MESSAGE_SIZE", default_value_t = 64 * 1024, help_heading = "Limits")]
    pub max_message_size: usize,

    /// Bytes the WebSocket codec reads per call, and keeps allocated per
    /// connection from the first read on. Small keeps idle connections
    /// cheap (≈ 4.4 KB each at 512). Whole data frames skip the codec
    /// (the session takes them straight from what it read), so this only
    /// paces fragmented messages and control frames: a fragment larger
    /// than this takes one pass through the codec per this many bytes.
    #[arg(long, env = "WSPROTO_READ_BUFFER", default_value_t = 512, value_parser = parse_read_buffer, help_heading = "Limits")]
    pub read_buffer: usize,

    /// Frames that may wait in one session's send queue; a client that lets
    /// it fill up is closed with 1008 (or loses droppable frames, per
    /// --topic-policy).
    #[arg(long, env = "WSPROTO_SEND_QUEUE", default_value_t = 256, value_parser = clap::value_parser!(usize), help_heading = "Limits")]
    pub send_queue: usize,

    /// Bytes that may wait in one session's send queue (a single larger
    /// frame still goes through an empty queue); keeps memory per client
    /// bounded whatever it asks for.
    #[arg(long, env = "WSPROTO_SEND_QUEUE_BYTES", default_value_t = 1024 * 1024, help_heading = "Limits")]
    pub send_queue_bytes: usize,

    /// How often the server pings each client.
    #[arg(long, env = "WSPROTO_PING_INTERVAL", default_value = "20s", value_parser = parse_positive_duration, help_heading = "Connection")]
    pub ping_interval: Duration,

    /// A client silent this long (no pong, no frame) is closed with 4000.
    #[arg(long, env = "WSPROTO_PING_TIMEOUT", default_value = "50s", value_parser = parse_positive_duration, help_heading = "Connection")]
    pub ping_timeout: Duration,

    /// A write to a client that takes longer than this drops the connection
    /// (the client is too slow even to take a close frame).
    #[arg(long, env = "WSPROTO_WRITE_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration, help_heading = "Connection")]
    pub write_timeout: Duration,

    /// How long a connection may stay plain HTTP (slow headers, idle
    /// keep-alive, unfinished upgrade) before it is closed.
    #[arg(long, env = "WSPROTO_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration, help_heading = "Connection")]
    pub handshake_timeout: Duration,

    /// Connections allowed to be plain HTTP at once (before their upgrade,
    /// or serving pages); past it new connections wait in the listen
    /// backlog.
    #[arg(long, env = "WSPROTO_MAX_HANDSHAKES", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Limits")]
    pub max_handshakes: u32,

    /// Connections not yet upgraded allowed from one IP address (IPv6: one
    /// /64); more are answered 429 with Retry-After at once, so one host
    /// cannot hold every --max-handshakes slot. Half of them by default: a
    /// NAT's thousands of clients reconnecting at once get in quickly.
    #[arg(long, env = "WSPROTO_MAX_HANDSHAKES_PER_IP", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Limits")]
    pub max_handshakes_per_ip: u32,

    /// Largest HTTP request head (request line and headers) in bytes;
    /// larger ones get 431. Like nginx's header buffers, it bounds what a
    /// connection can make the server hold before its upgrade.
    #[arg(long, env = "WSPROTO_MAX_REQUEST_HEAD", default_value_t = 16 * 1024, value_parser = clap::value_parser!(u32).range(1024..), help_heading = "Limits")]
    pub max_request_head: u32,

    /// Open WebSocket sessions allowed at once; upgrades past it get HTTP 503.
    #[arg(
        long,
        env = "WSPROTO_MAX_CONNECTIONS",
        default_value_t = 10_000,
        help_heading = "Limits"
    )]
    pub max_connections: usize,

    /// On shutdown, how long to wait for clients to answer Close 1001.
    #[arg(long, env = "WSPROTO_SHUTDOWN_TIMEOUT", default_value = "5s", value_parser = parse_positive_duration, help_heading = "Connection")]
    pub shutdown_timeout: Duration,

    /// Key for the HTTP publish API (`Authorization: Bearer KEY`); without
    /// one the API is off.
    #[arg(
        long,
        env = "WSPROTO_API_KEY",
        hide_env_values = true,
        help_heading = "Auth"
    )]
    pub api_key: Option<String>,

    /// Queue policy for topics covered by PATTERN, as
    /// `PATTERN=disconnect|drop-oldest|conflate[,critical]`; repeatable
    /// (`;`-separated in the env var), first match wins. Default: disconnect.
    #[arg(long = "topic-policy", env = "WSPROTO_TOPIC_POLICY", value_delimiter = ';', value_parser = parse_topic_policy, help_heading = "Hub")]
    pub topic_policies: Vec<(Topic, DeliveryPolicy)>,

    /// History kept for topics and rooms covered by PATTERN, as
    /// `PATTERN=COUNT[,MAX_AGE]` (e.g. `rowdata.#=100,60s`): the last COUNT
    /// messages (at most 10000), none older than MAX_AGE. Clients that
    /// reconnect recover what they missed from it. Repeatable (`;`-separated
    /// in the env var), first match wins. Default: none.
    #[arg(long = "history", env = "WSPROTO_HISTORY", value_delimiter = ';', value_parser = parse_history, help_heading = "Hub")]
    pub history: Vec<(Topic, HistoryPolicy)>,

    /// History of each user's stream of critical pushes (`POST /api/publish`
    /// with `"critical": true`), as `COUNT[,MAX_AGE]`, or `none`: what a
    /// device that reconnects recovers from its acknowledged position.
    #[arg(long = "user-history", env = "WSPROTO_USER_HISTORY", default_value = "1000,1d", value_parser = parse_user_history, help_heading = "Hub")]
    // Spelled out so that clap takes `none` through the parser rather
    // than treating the flag as optional.
    pub user_history: std::option::Option<HistoryPolicy>,

    /// Critical deliveries a device (`?device=`) may leave unacknowledged;
    /// past it the session is closed with 4003 and recovers from its
    /// acknowledged position when it reconnects.
    #[arg(long, env = "WSPROTO_ACK_WINDOW", default_value_t = 1024, value_parser = parse_ack_window, help_heading = "Hub")]
    pub ack_window: usize,

    /// A critical delivery a device has not acknowledged this long after it
    /// was queued is sent again (marked redelivered), then after 2, 4, 8
    /// and at most 16 times as long.
    #[arg(long, env = "WSPROTO_ACK_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration, help_heading = "Hub")]
    pub ack_timeout: Duration,

    /// Topic patterns clients may PUBLISH to over WebSocket; repeatable
    /// (`,`-separated). Default: none — backends publish through the HTTP API.
    #[arg(
        long = "client-publish",
        env = "WSPROTO_CLIENT_PUBLISH",
        value_delimiter = ',',
        help_heading = "Hub"
    )]
    pub client_publish: Vec<Topic>,

    /// Subscriptions one session may hold.
    #[arg(
        long,
        env = "WSPROTO_MAX_SUBSCRIPTIONS",
        default_value_t = 1000,
        help_heading = "Limits"
    )]
    pub max_subscriptions: usize,

    /// Rooms one session may be in.
    #[arg(
        long,
        env = "WSPROTO_MAX_ROOMS",
        default_value_t = 100,
        help_heading = "Limits"
    )]
    pub max_rooms: usize,

    /// Browser origins allowed besides same-origin pages:
    /// `https://app.example.com`, `https://*.example.com`, or `*` for any;
    /// repeatable (`,`-separated). Refused origins get HTTP 403.
    #[arg(
        long = "allowed-origin",
        env = "WSPROTO_ALLOWED_ORIGINS",
        value_delimiter = ',',
        help_heading = "Connection"
    )]
    pub allowed_origins: Vec<OriginPattern>,

    /// Open WebSocket sessions allowed from one IP address (IPv6: one /64);
    /// more get HTTP 429. Large NATs put thousands of clients behind one
    /// address; behind a proxy, see --trusted-proxy.
    #[arg(
        long,
        env = "WSPROTO_MAX_CONNECTIONS_PER_IP",
        default_value_t = 4096,
        help_heading = "Limits"
    )]
    pub max_connections_per_ip: usize,

    /// Frames a second one session may send on average (0: no limit).
    /// Frames over it are not processed (the first 10 refused each second
    /// get a RATE_LIMITED error frame); more than --rate-burst refused with
    /// no quiet second between them closes the session with 4002.
    #[arg(
        long,
        env = "WSPROTO_RATE_LIMIT",
        default_value_t = 100.0,
        help_heading = "Limits"
    )]
    pub rate_limit: f64,

    /// Frames one session may send at once before the rate limit applies.
    #[arg(
        long,
        env = "WSPROTO_RATE_BURST",
        default_value_t = 200,
        help_heading = "Limits"
    )]
    pub rate_burst: u32,

    /// PEM certificate chain: serve `wss://` (with --tls-key).
    #[arg(
        long,
        env = "WSPROTO_TLS_CERT",
        requires = "tls_key",
        help_heading = "TLS"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(
        long,
        env = "WSPROTO_TLS_KEY",
        requires = "tls_cert",
        help_heading = "TLS"
    )]
    pub tls_key: Option<PathBuf>,

    /// Require JWTs signed with this HS256 secret at upgrade. Without a
    /// secret or public key the server runs in insecure mode.
    #[arg(
        long,
        env = "WSPROTO_JWT_SECRET",
        hide_env_values = true,
        help_heading = "Auth"
    )]
    pub jwt_secret: Option<String>,

    /// Require JWTs verified with this PEM public key (EC: ES256, RSA: RS256).
    #[arg(long, env = "WSPROTO_JWT_PUBLIC_KEY", help_heading = "Auth")]
    pub jwt_public_key: Option<String>,

    /// Required `aud` claim.
    #[arg(long, env = "WSPROTO_JWT_AUDIENCE", help_heading = "Auth")]
    pub jwt_audience: Option<String>,

    /// Required `iss` claim.
    #[arg(long, env = "WSPROTO_JWT_ISSUER", help_heading = "Auth")]
    pub jwt_issuer: Option<String>,

    /// Cookie a browser may carry its token in.
    #[arg(
        long,
        env = "WSPROTO_JWT_COOKIE",
        default_value = "wsproto_token",
        help_heading = "Auth"
    )]
    pub jwt_cookie: String,

    /// Where publications go between nodes: `memory` (this process only) or
    /// `redis://HOST:PORT[/DB]` (every node on that Redis acts as one server).
    #[arg(
        long,
        env = "WSPROTO_BROKER",
        default_value = "memory",
        help_heading = "Cluster"
    )]
    pub broker: BrokerChoice,

    /// This node's id, unique in the deployment; it prefixes session ids.
    /// Default: 8 random hex digits.
    #[arg(long, env = "WSPROTO_NODE_ID", value_parser = parse_node_id, help_heading = "Cluster")]
    pub node_id: Option<String>,

    /// Prefix of every Redis key and channel (deployments may share a Redis).
    #[arg(long, env = "WSPROTO_REDIS_PREFIX", default_value = "wsproto", value_parser = parse_node_id, help_heading = "Cluster")]
    pub redis_prefix: String,
}

/// The broker a node publishes through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BrokerChoice {
    /// In-process: a single node.
    #[default]
    Memory,
    /// A Redis server at this URL.
    Redis(String),
}

impl std::str::FromStr for BrokerChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<BrokerChoice, String> {
        match s {
            "memory" => Ok(BrokerChoice::Memory),
            url if url.starts_with("redis://") => Ok(BrokerChoice::Redis(url.to_owned())),
            _ => Err("expected memory or redis://HOST:PORT[/DB]".into()),
        }
    }
}

/// A node id or key prefix: 1 to 64 of `A-Z a-z 0-9 _ . -`.
fn parse_node_id(s: &str) -> Result<String, String> {
    let valid = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    match valid {
        true => Ok(s.to_owned()),
        false => Err("1 to 64 of A-Z a-z 0-9 _ . -".into()),
    }
}

impl Config {
    /// Insecure mode: no key to verify tokens with, so identities are
    /// whatever the connect URL says.
    pub fn is_insecure(&self) -> bool {
        self.jwt_secret.is_none() && self.jwt_public_key.is_none()
    }

    /// The authentication part of the settings.
    pub(crate) fn auth(&self) -> AuthSettings {
        AuthSettings {
            secret: self.jwt_secret.clone(),
            public_key: self.jwt_public_key.clone(),
            audience: self.jwt_audience.clone(),
            issuer: self.jwt_issuer.clone(),
            cookie: self.jwt_cookie.clone(),
        }
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: ListenAddr::AnyInterface(8080),
            insecure_allow_remote: false,
            listen_backlog: 4096,
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
            ws_path: "/ws".into(),
            max_message_size: 64 * 1024,
            read_buffer: 512,
            send_queue: 256,
            send_queue_bytes: 1024 * 1024,
            ping_interval: Duration::from_secs(20),
            ping_timeout: Duration::from_secs(50),
            write_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 1024,
            max_handshakes_per_ip: 512,
            max_request_head: 16 * 1024,
            max_connections: 10_000,
            shutdown_timeout: Duration::from_secs(5),
            api_key: None,
            topic_policies: Vec::new(),
            history: Vec::new(),
            user_history: Some(HistoryPolicy {
                max_len: 1000,
                max_age: Some(Duration::from_secs(24 * 3600)),
            }),
            ack_window: 1024,
            ack_timeout: Duration::from_secs(10),
            client_publish: Vec::new(),
            max_subscriptions: 1000,
            max_rooms: 100,
            allowed_origins: Vec::new(),
            max_connections_per_ip: 4096,
            rate_limit: 100.0,
            rate_burst: 200,
            tls_cert: None,
            tls_key: None,
            jwt_secret: None,
            jwt_public_key: None,
            jwt_audience: None,
            jwt_issuer: None,
            jwt_cookie: "wsproto_token".into(),
            broker: BrokerChoice::Memory,
            node_id: None,
            redis_prefix: "wsproto".into(),
        }
    }
}

/// A duration such as `20s` or `500ms`; zero would disable the check it
/// configures (or, for the ping interval, make no sense at all).
fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(duration) if duration.is_zero() => Err("must be more than zero".into()),
        Ok(duration) => Ok(duration),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_topic_policy(s: &str) -> Result<(Topic, DeliveryPolicy), String> {
    let (pattern, policy) = s
        .split_once('=')
        .ok_or_else(|| format!("expected PATTERN=POLICY, got {s:?}"))?;
    let pattern = Topic::parse(pattern.trim()).map_err(|e| e.to_string())?;
    let policy = policy
        .parse()
        .map_err(|e: crate::queue::PolicyError| e.to_string())?;
    Ok((pattern, policy))
}

fn parse_history(s: &str) -> Result<(Topic, HistoryPolicy), String> {
    let (pattern, policy) = s
        .split_once('=')
        .ok_or_else(|| format!("expected PATTERN=COUNT[,MAX_AGE], got {s:?}"))?;
    let pattern = Topic::parse(pattern.trim()).map_err(|e| e.to_string())?;
    Ok((pattern, parse_history_policy(policy)?))
}

fn parse_ack_window(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n @ 1..=1_000_000) => Ok(n),
        _ => Err(format!("expected 1 to 1000000 deliveries, got {s:?}")),
    }
}

fn parse_read_buffer(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n @ 64..=1_048_576) => Ok(n),
        _ => Err(format!("expected 64 to 1048576 bytes, got {s:?}")),
    }
}

fn parse_user_history(s: &str) -> Result<Option<HistoryPolicy>, String> {
    match s.trim() {
        "none" => Ok(None),
        policy => parse_history_policy(policy).map(Some),
    }
}

/// `COUNT[,MAX_AGE]`.
fn parse_history_policy(policy: &str) -> Result<HistoryPolicy, String> {
    let (count, age) = match policy.split_once(',') {
        Some((count, age)) => (count, Some(age)),
        None => (policy, None),
    };
    let max_len: usize = count
        .trim()
        .parse()
        .map_err(|_| format!("history COUNT must be a number, got {count:?}"))?;
    if max_len == 0 || max_len > MAX_REPLAY {
        return Err(format!(
            "history COUNT must be between 1 and {MAX_REPLAY}, got {max_len}"
        ));
    }
    let max_age = age
        .map(|age| humantime::parse_duration(age.trim()))
        .transpose()
        .map_err(|e| format!("history MAX_AGE: {e}"))?;
    if max_age.is_some_and(|age| age.is_zero()) {
        return Err("history MAX_AGE must be more than 0s".into());
    }
    Ok(HistoryPolicy { max_len, max_age })
}

fn parse_path(path: &str) -> Result<String, String> {
    match path.starts_with('/') {
        true => Ok(path.to_owned()),
        false => Err(format!("path must start with '/': {path:?}")),
    }
}

/// Where to listen, in the forms Go programs accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `:PORT`: every interface, IPv6 and IPv4 where the system allows.
    AnyInterface(u16),
    /// `IP:PORT` or `[IPv6]:PORT`.
    Socket(SocketAddr),
    /// `HOST:PORT`, resolved when binding.
    Host(String, u16),
}

/// A listen address that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid listen address {0:?}: expected :PORT, HOST:PORT or [IPv6]:PORT")]
pub struct ListenAddrError(String);

impl FromStr for ListenAddr {
    type Err = ListenAddrError;

    fn from_str(s: &str) -> Result<ListenAddr, ListenAddrError> {
        let err = || ListenAddrError(s.to_owned());
        if let Some(port) = s.strip_prefix(':') {
            return port
                .parse()
                .map(ListenAddr::AnyInterface)
                .map_err(|_| err());
        }
        if let Ok(addr) = s.parse() {
            return Ok(ListenAddr::Socket(addr));
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(err)?;
        let port = port.parse().map_err(|_| err())?;
        if host.is_empty() || host.contains(':') || host.contains('[') {
            return Err(err());
        }
        Ok(ListenAddr::Host(host.to_owned(), port))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::AnyInterface(port) => write!(f, ":{port}"),
            ListenAddr::Socket(addr) => write!(f, "{addr}"),
            ListenAddr::Host(host, port) => write!(f, "{host}:{port}"),
        }
    }
}

impl ListenAddr {
    /// Binds a listener reachable from loopback only, for insecure mode:
    /// `:PORT` narrows to `127.0.0.1:PORT`, and an address that is not
    /// loopback is refused with [`io::ErrorKind::PermissionDenied`].
    ///
    /// # Errors
    /// As [`ListenAddr::bind`], and for a non-loopback address.
    pub async fn bind_loopback(&self, backlog: u32) -> io::Result<TcpListener> {
        self.bind_first(true, backlog).await
    }

    /// Binds a listener. `:PORT` tries the IPv6 wildcard first (which also
    /// accepts IPv4 on Linux) and falls back to `0.0.0.0` where IPv6 is off.
    ///
    /// # Errors
    /// When the host does not resolve or no address can be bound.
    pub async fn bind(&self, backlog: u32) -> io::Result<TcpListener> {
        self.bind_first(false, backlog).await
    }

    /// Binds the first address this stands for that can be bound (and,
    /// with `loopback_only`, is loopback), with a listen queue of `backlog`;
    /// otherwise the last error.
    async fn bind_first(&self, loopback_only: bool, backlog: u32) -> io::Result<TcpListener> {
        let candidates: Vec<SocketAddr> = match self {
            ListenAddr::AnyInterface(port) if loopback_only => {
                vec![SocketAddr::from(([127, 0, 0, 1], *port))]
            }
            ListenAddr::AnyInterface(port) => vec![
                SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, *port)),
                SocketAddr::from(([0, 0, 0, 0], *port)),
            ],
            ListenAddr::Socket(addr) => vec![*addr],
            ListenAddr::Host(host, port) => lookup_host((host.as_str(), *port)).await?.collect(),
        };
        let mut last_err = None;
        for addr in candidates {
            if loopback_only && !addr.ip().to_canonical().is_loopback() {
                last_err = Some(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{addr} is not a loopback address, and insecure mode (no --jwt-secret or \
                         --jwt-public-key) lets anyone claim any user id: configure a JWT key, \
                         or pass --insecure-allow-remote to accept that"
                    ),
                ));
                continue;
            }
            match listen(addr, backlog) {
                Ok(listener) => return Ok(listener),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other(format!("{self} resolves to no address"))))
    }
}

/// A listener on `addr` with a listen queue of `backlog` (as
/// `TcpListener::bind`, which always asks for 1024).
fn listen(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As TcpListener::bind: a restart can bind while old connections linger.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    #[test]
    fn defaults_match_the_flags_defaults() {
        // Env vars would override the flag defaults; none are set in tests.
        assert!(std::env::vars().all(|(k, _)| !k.starts_with("WSPROTO_")));
        assert_eq!(
            Cli::parse_from(["wsproto-server"]).config,
            Config::default()
        );
    }

    #[test]
    fn listen_addresses_in_go_and_socket_forms() {
        assert_eq!(":8080".parse(), Ok(ListenAddr::AnyInterface(8080)));
        assert_eq!(
            "127.0.0.1:9000".parse(),
            Ok(ListenAddr::Socket("127.0.0.1:9000".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:9000".parse(),
            Ok(ListenAddr::Socket("[::1]:9000".parse().unwrap()))
        );
        assert_eq!(
            "localhost:80".parse(),
            Ok(ListenAddr::Host("localhost".into(), 80))
        );
        for bad in ["8080", ":", ":99999", "host:", "::1:80", "[::1]", ""] {
            assert!(
                bad.parse::<ListenAddr>().is_err(),
                "{bad:?} should not parse"
            );
        }
    }

    #[test]
    fn read_buffer_is_bounded() {
        let cli = Cli::parse_from(["s", "--read-buffer", "8192"]);
        assert_eq!(cli.config.read_buffer, 8192);
        for bad in ["0", "63", "1048577", "4k"] {
            assert!(
                Cli::try_parse_from(["s", "--read-buffer", bad]).is_err(),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn topic_policies_and_client_publish_patterns() {
        let cli = Cli::parse_from([
            "s",
            "--topic-policy",
            "alarm.#=critical",
            "--topic-policy",
            "rowdata.#=conflate",
            "--client-publish",
            "chat.#,demo.*",
        ]);
        let policies: Vec<String> = cli
            .config
            .topic_policies
            .iter()
            .map(|(t, p)| format!("{t}={p}"))
            .collect();
        assert_eq!(
            policies,
            ["alarm.#=disconnect,critical", "rowdata.#=conflate"]
        );
        assert_eq!(cli.config.client_publish.len(), 2);
        assert!(Cli::try_parse_from(["s", "--topic-policy", "alarm"]).is_err());
    }

    #[test]
    fn history_policies_parse_and_bad_ones_are_refused() {
        let cli = Cli::try_parse_from([
            "s",
            "--history",
            "rowdata.#=100,60s",
            "--history",
            "chat.*=50",
        ])
        .unwrap();
        let history = cli.config.history;
        assert_eq!(history[0].0.as_str(), "rowdata.#");
        assert_eq!(
            history[0].1,
            HistoryPolicy {
                max_len: 100,
                max_age: Some(std::time::Duration::from_secs(60))
            }
        );
        assert_eq!(history[1].1.max_age, None);
        for bad in ["a", "a=0", "a=x", "a=20000", "a=5,0s", "a=5,soon", "a..b=5"] {
            assert!(
                Cli::try_parse_from(["s", "--history", bad]).is_err(),
                "{bad}"
            );
        }
        assert!(Cli::try_parse_from(["s", "--topic-policy", "a..b=conflate"]).is_err());
        assert!(Cli::try_parse_from(["s", "--topic-policy", "a=sometimes"]).is_err());
    }

    #[test]
    fn acknowledged_delivery_settings_parse_with_their_defaults() {
        let defaults = Cli::try_parse_from(["s"]).unwrap().config;
        assert_eq!(defaults.user_history, Config::default().user_history);
        assert_eq!(
            (defaults.ack_window, defaults.ack_timeout),
            (1024, std::time::Duration::from_secs(10))
        );
        let cli = Cli::try_parse_from([
            "s",
            "--user-history",
            "none",
            "--ack-window",
            "8",
            "--ack-timeout",
            "2s",
        ])
        .unwrap();
        assert_eq!(cli.config.user_history, None);
        assert_eq!(cli.config.ack_window, 8);
        let kept = Cli::try_parse_from(["s", "--user-history", "50,1h"]).unwrap();
        assert_eq!(kept.config.user_history.map(|h| h.max_len), Some(50));
        for bad in [
            ["--user-history", "0"],
            ["--ack-window", "0"],
            ["--ack-timeout", "0s"],
        ] {
            assert!(
                Cli::try_parse_from(["s", bad[0], bad[1]]).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn edge_flags_parse_and_proxy_protocol_needs_trusted_proxies() {
        let cli = Cli::parse_from([
            "s",
            "--trusted-proxy",
            "10.0.0.0/8,127.0.0.1",
            "--proxy-protocol",
            "--listen-backlog",
            "100",
            "--max-request-head",
            "8192",
        ]);
        let networks: Vec<String> = cli
            .config
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(networks, ["10.0.0.0/8", "127.0.0.1/32"]);
        assert!(cli.config.proxy_protocol);
        assert_eq!(
            (cli.config.listen_backlog, cli.config.max_request_head),
            (100, 8192)
        );
        assert!(Cli::try_parse_from(["s", "--proxy-protocol"]).is_err());
        assert!(Cli::try_parse_from(["s", "--trusted-proxy", "nginx"]).is_err());
        assert!(Cli::try_parse_from(["s", "--listen-backlog", "0"]).is_err());
        assert!(Cli::try_parse_from(["s", "--max-request-head", "100"]).is_err());
    }

    #[test]
    fn ws_path_must_be_absolute() {
        assert!(Cli::try_parse_from(["s", "--ws-path", "ws"]).is_err());
        assert_eq!(
            Cli::parse_from(["s", "--ws-path", "/x"]).config.ws_path,
            "/x"
        );
    }
}
