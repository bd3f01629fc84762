//! `wsproto-client bench`: a load generator, both for sizing a deployment
//! and for comparing wsproto with the raw tokio-tungstenite baseline
//! (`benches/baseline`) on the same workloads.
//!
//! - `echo`: N connections, each keeping D frames in flight; round trips/s
//!   and latency percentiles.
//! - `fanout`: N subscribers on a topic and one publisher; deliveries/s,
//!   losses and end-to-end latency.
//! - `connections`: N idle sessions held; with `--server-pid`, the server's
//!   memory per connection.
//!
//! Connections are opened at a ramp so thousands of them do not overflow
//! the server's accept backlog. Latencies go into HdrHistograms (recorded
//! in nanoseconds, reported in µs). `--json` prints one line per run, which
//! `benches/compare.sh` turns into the ratio tables in the README.

use std::{
    collections::VecDeque,
    future::Future,
    io::IsTerminal,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use bytes::{BufMut, Bytes, BytesMut};
use clap::{Args, Subcommand, ValueEnum};
use futures_util::{FutureExt, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use prost::Message as _;
use serde_json::json;
use tokio::{
    net::{TcpSocket, TcpStream},
    sync::{Notify, Semaphore},
    task::JoinSet,
};
use tokio_tungstenite::{
    tungstenite::{client::IntoClientRequest, http::Uri, protocol::WebSocketConfig, Message},
    WebSocketStream,
};
use wsproto::{opcode, proto::v1, Frame};

type Ws = WebSocketStream<TcpStream>;

/// Handshakes in progress at once while connecting (under the server's
/// default `--max-handshakes-per-ip`).
const CONNECTING_AT_ONCE: usize = 128;
/// Idle connections per source address before another 127.0.0.x is used
/// (the ephemeral port range gives about 28,000 per address pair).
const CONNECTIONS_PER_SOURCE: usize = 25_000;
/// Longest wait for one connection: TCP, upgrade and WELCOME.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a write or a close once a run's time is up.
const GRACE: Duration = Duration::from_secs(5);
/// Descriptors kept for everything else when sizing `connections` runs.
const SPARE_FDS: u64 = 100;

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    mode: Mode,

    /// The server is `baseline-server` (benches/baseline): plain echo, and
    /// fan-out through its `/sub` and `/pub` paths instead of topics.
    #[arg(long, global = true)]
    raw: bool,

    /// Print one JSON line instead of a summary.
    #[arg(long, global = true)]
    json: bool,

    /// New connections a second while connecting.
    #[arg(long, global = true, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    ramp: u32,
}

#[derive(Subcommand)]
enum Mode {
    /// Round trips: every connection keeps --depth frames in flight.
    Echo(EchoArgs),
    /// One publisher, --subs subscribers of one topic.
    Fanout(FanoutArgs),
    /// Hold idle sessions and report how many held (and the server's RSS).
    Connections(ConnectionsArgs),
}

#[derive(Args)]
struct EchoArgs {
    /// Connections.
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// Frames in flight per connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    depth: u32,
    /// Payload bytes per frame (after the 4-byte opcode).
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// How long to measure.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Opcode of the frames (100 is ECHO).
    #[arg(long, default_value_t = opcode::ECHO)]
    opcode: u32,
}

#[derive(Args)]
struct FanoutArgs {
    /// Subscribers.
    #[arg(long, default_value_t = 100)]
    subs: usize,
    /// Message bytes (at least 32: a sequence number and a timestamp).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(32..))]
    size: u64,
    /// Messages a second, or `max`: publish as fast as subscribers take
    /// them, with at most --window messages not yet delivered to all.
    #[arg(long, default_value = "max", value_parser = parse_rate)]
    rate: Rate,
    /// How long to publish.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Messages in flight with `--rate max`.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    window: u64,
    /// Topic to publish to (the server must allow clients to publish there,
    /// e.g. `--client-publish 'bench.#'`, unless --via http).
    #[arg(long, default_value = "bench.fanout")]
    topic: String,
    /// How the publisher publishes: PUBLISH frames or the HTTP publish API.
    #[arg(long, value_enum, default_value_t = Via::Ws)]
    via: Via,
    /// Key of the HTTP publish API (with --via http).
    #[arg(long, env = "WSPROTO_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Via {
    Ws,
    Http,
}

#[derive(Args)]
struct ConnectionsArgs {
    /// Idle connections to open (capped by the open-file limit, which is
    /// raised to its hard maximum first).
    #[arg(long, default_value_t = 1000)]
    conns: usize,
    /// How long to hold them once all are open.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// Process id of the server, to report its resident memory per connection.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Source addresses 127.0.0.1..=127.0.0.N to spread connections over
    /// (default: one per 25,000 connections, for a loopback server).
    #[arg(long)]
    sources: Option<u8>,
}

/// How fast `fanout` publishes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rate {
    /// As fast as subscribers take messages, --window in flight.
    Max,
    /// Messages a second.
    PerSecond(f64),
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    if s == "max" {
        return Ok(Rate::Max);
    }
    match s.parse::<f64>() {
        Ok(rate) if rate > 0.0 && rate <= 1e6 => Ok(Rate::PerSecond(rate)),
        _ => Err(format!(
            "expected `max` or messages a second (at most 1000000), got {s:?}"
        )),
    }
}

/// Runs one benchmark against `url`; `false` when it saw errors.
pub async fn run(url: &str, token: Option<&str>, args: BenchArgs) -> anyhow::Result<bool> {
    // Every connection costs one descriptor here (and one in the server).
    let fd_limit =
        rlimit::increase_nofile_limit(u64::MAX).context("cannot raise the open-file limit")?;
    let connector = Arc::new(Connector::new(url, token, args.raw).await?);
    let report = match args.mode {
        Mode::Echo(mode) => echo(&connector, args.ramp, mode).await?,
        Mode::Fanout(mode) => fanout(&connector, args.ramp, mode).await?,
        Mode::Connections(mode) => connections(&connector, args.ramp, mode, fd_limit).await?,
    };
    let ok =
        report["errors"].as_u64().unwrap_or(0) == 0 && report["lost"].as_u64().unwrap_or(0) == 0;
    match args.json {
        true => println!("{report}"),
        false => print_summary(&report),
    }
    Ok(ok)
}

/// Opens WebSocket connections to one server, from chosen source addresses.
#[derive(Clone)]
struct Connector {
    url: String,
    /// The server's addresses, tried in order.
    addrs: Vec<SocketAddr>,
    token: Option<String>,
    raw: bool,
    sources: Vec<IpAddr>,
    config: WebSocketConfig,
}

impl Connector {
    async fn new(url: &str, token: Option<&str>, raw: bool) -> anyhow::Result<Connector> {
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

    /// The URL with its path replaced (the baseline's `/sub` and `/pub`).
    fn url_with_path(&self, path: &str) -> String {
        let after_scheme = self.url.find("://").map_or(0, |i| i + 3);
        let host_end = self.url[after_scheme..]
            .find('/')
            .map_or(self.url.len(), |i| after_scheme + i);
        format!("{}{path}", &self.url[..host_end])
    }

    /// Opens connection number `index` to `url`, within [`CONNECT_TIMEOUT`];
    /// a wsproto session's WELCOME is read before it is handed over.
    async fn connect(&self, url: &str, index: usize) -> anyhow::Result<Ws> {
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
async fn next_frame(ws: &mut Ws) -> anyhow::Result<Frame> {
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
async fn connect_all<T, F, Fut>(
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
fn check_connected(
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

async fn echo(
    connector: &Arc<Connector>,
    ramp: u32,
    args: EchoArgs,
) -> anyhow::Result<serde_json::Value> {
    let (sockets, failed, first_error) = connect_all(args.conns, ramp, |index| {
        let connector = connector.clone();
        async move { connector.connect(&connector.url, index).await }
    })
    .await;
    check_connected(args.conns, sockets.len(), first_error)?;
    let frame = Frame::new(args.opcode, vec![b'x'; args.size]).encode();
    let stats = Arc::new(Stats::default());
    let started = Instant::now();
    let deadline = started + args.duration;
    let progress = Progress::ticking("echo", stats.clone(), args.duration);
    let mut workers = JoinSet::new();
    for (index, ws) in sockets.into_iter().enumerate() {
        let (frame, stats) = (frame.clone(), stats.clone());
        workers.spawn(echo_worker(
            ws,
            frame,
            args.depth as usize,
            deadline,
            stats,
            index,
        ));
    }
    while workers.join_next().await.is_some() {}
    progress.done();
    let elapsed = started.elapsed().min(args.duration).as_secs_f64();
    let ops = stats.ops.load(Ordering::Relaxed);
    let mut report = json!({
        "mode": "echo",
        "conns": args.conns,
        "depth": args.depth,
        "size": args.size,
        "duration_s": elapsed,
        "ops": ops,
        "ops_per_s": ops as f64 / elapsed,
        "errors": stats.errors.load(Ordering::Relaxed) + failed as u64,
        "connected": args.conns - failed,
    });
    stats.latencies.report_into(&mut report);
    Ok(report)
}

/// One connection of `echo`: refills to `depth` frames in flight after
/// each read, with one flush per refill, until `deadline`.
async fn echo_worker(
    mut ws: Ws,
    frame: Bytes,
    depth: usize,
    deadline: Instant,
    stats: Arc<Stats>,
    index: usize,
) {
    let mut in_flight: VecDeque<Instant> = VecDeque::with_capacity(depth);
    let tokio_deadline = tokio::time::Instant::from_std(deadline);
    // Writes are bounded too: a server that stops reading must not hang the run.
    let write_deadline = tokio_deadline + GRACE;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if in_flight.len() < depth {
            let refill = async {
                while in_flight.len() < depth {
                    ws.feed(Message::Binary(frame.clone())).await?;
                    in_flight.push_back(now);
                }
                ws.flush().await
            };
            if !matches!(
                tokio::time::timeout_at(write_deadline, refill).await,
                Ok(Ok(()))
            ) {
                return stats.fail();
            }
        }
        let first = match tokio::time::timeout_at(tokio_deadline, ws.next()).await {
            Err(_) => break,
            Ok(message) => message,
        };
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                Some(Ok(Message::Binary(reply))) => {
                    let sent = in_flight.pop_front();
                    let now = Instant::now();
                    if reply.len() != frame.len() || reply[..4] != frame[..4] {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                    } else if now < deadline {
                        stats.ops.fetch_add(1, Ordering::Relaxed);
                        if let Some(sent) = sent {
                            stats.latencies.record(index, now - sent);
                        }
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => return stats.fail(),
                Some(Ok(_)) => {}
            }
            // Take every reply already here before writing again.
            next = ws.next().now_or_never();
        }
    }
    let _ = tokio::time::timeout(GRACE, ws.close(None)).await;
}

async fn fanout(
    connector: &Arc<Connector>,
    ramp: u32,
    args: FanoutArgs,
) -> anyhow::Result<serde_json::Value> {
    if connector.raw && args.via == Via::Http {
        bail!("--via http needs a wsproto server (the baseline has no publish API)");
    }
    let sub_url = match connector.raw {
        true => connector.url_with_path("/sub"),
        false => connector.url.clone(),
    };
    let topic = args.topic.clone();
    let (subscribers, failed, first_error) = connect_all(args.subs, ramp, |index| {
        let (connector, url, topic) = (connector.clone(), sub_url.clone(), topic.clone());
        async move {
            let mut ws = connector.connect(&url, index).await?;
            if !connector.raw {
                subscribe(&mut ws, &topic).await?;
            }
            Ok(ws)
        }
    })
    .await;
    check_connected(args.subs, subscribers.len(), first_error)?;
    let subs = subscribers.len() as u64;
    // The baseline subscribes a connection just after its handshake.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let shared = Arc::new(Fanout {
        stats: Stats::default(),
        subs,
        epoch: Instant::now(),
        delivered: Notify::new(),
        last_delivery_ns: AtomicU64::new(0),
    });
    let mut readers = JoinSet::new();
    for (index, ws) in subscribers.into_iter().enumerate() {
        readers.spawn(fanout_reader(ws, shared.clone(), connector.raw, index));
    }

    let mut publisher = Publisher::connect(connector, &args, shared.clone()).await?;
    let progress = Progress::ticking("fanout", shared.clone(), args.duration);
    let started = Instant::now();
    let deadline = started + args.duration;
    let per_second = match args.rate {
        Rate::Max => None,
        Rate::PerSecond(rate) => Some(rate),
    };
    let mut ticks = per_second.map(|rate| {
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        ticks
    });
    let mut published = 0u64;
    while Instant::now() < deadline {
        match &mut ticks {
            Some(ticks) => {
                ticks.tick().await;
            }
            None => {
                // Closed loop: wait while --window messages are not yet
                // delivered to every subscriber.
                let window = args.window.saturating_sub(1) * subs;
                while (published * subs).saturating_sub(shared.stats.ops.load(Ordering::Relaxed))
                    > window
                {
                    let wake = tokio::time::timeout(
                        Duration::from_millis(50),
                        shared.delivered.notified(),
                    );
                    if wake.await.is_err() && Instant::now() >= deadline {
                        break;
                    }
                }
                if Instant::now() >= deadline {
                    break;
                }
            }
        }
        // At a fixed rate a message is stamped with when it was due, so a
        // publisher held back by the server shows up in the latency.
        let sent = match per_second {
            Some(rate) => {
                (started - shared.epoch) + Duration::from_secs_f64(published as f64 / rate)
            }
            None => shared.epoch.elapsed(),
        };
        let data = message_data(published, sent, args.size as usize);
        if let Err(err) = publisher.publish(&args.topic, data).await {
            progress.done();
            return Err(err.context(format!("publishing message {published}")));
        }
        published += 1;
    }
    let publishing = started.elapsed();

    // Let what is in flight arrive: until everything has, or nothing has for 2 s.
    let expected = published * subs;
    let (mut last, mut quiet_since) = (shared.stats.ops.load(Ordering::Relaxed), Instant::now());
    while last < expected && quiet_since.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = shared.stats.ops.load(Ordering::Relaxed);
        if now != last {
            (last, quiet_since) = (now, Instant::now());
        }
    }
    progress.done();
    readers.abort_all();
    publisher.close().await;

    let received = shared.stats.ops.load(Ordering::Relaxed);
    let last_delivery = Duration::from_nanos(shared.last_delivery_ns.load(Ordering::Relaxed));
    let span = last_delivery
        .saturating_sub(started - shared.epoch)
        .max(publishing)
        .as_secs_f64();
    let mut report = json!({
        "mode": "fanout",
        "subs": args.subs,
        "size": args.size,
        "rate": per_second,
        "duration_s": publishing.as_secs_f64(),
        "published": published,
        "expected": expected,
        "received": received,
        "lost": expected.saturating_sub(received),
        "deliveries_per_s": received as f64 / span,
        "errors": shared.stats.errors.load(Ordering::Relaxed) + failed as u64,
        "connected": subs,
    });
    shared.stats.latencies.report_into(&mut report);
    Ok(report)
}

/// What fan-out readers share with the publisher.
struct Fanout {
    stats: Stats,
    subs: u64,
    /// Timestamps in messages are nanoseconds since this instant.
    epoch: Instant,
    /// Signalled each time another `subs` deliveries have arrived.
    delivered: Notify,
    last_delivery_ns: AtomicU64,
}

/// Sequence number and send time (in hex), padded to `size` bytes: text,
/// so the HTTP publish API can carry it as is.
fn message_data(seq: u64, sent: Duration, size: usize) -> Bytes {
    let mut data = BytesMut::with_capacity(size);
    data.put_slice(format!("{seq:016x}{:016x}", sent.as_nanos() as u64).as_bytes());
    data.resize(size, b'.');
    data.freeze()
}

/// The send time written by [`message_data`].
fn sent_at(data: &[u8]) -> Option<Duration> {
    let hex = std::str::from_utf8(data.get(16..32)?).ok()?;
    u64::from_str_radix(hex, 16).ok().map(Duration::from_nanos)
}

async fn subscribe(ws: &mut Ws, topic: &str) -> anyhow::Result<()> {
    let request = v1::Subscribe {
        topics: vec![topic.to_owned()],
    };
    let frame = Frame::new(opcode::SUBSCRIBE, request.encode_to_vec()).with_request_id(Some(1));
    ws.send(Message::Binary(frame.encode())).await?;
    loop {
        let reply = next_frame(ws).await?;
        match reply.opcode {
            opcode::ACK if reply.request_id == Some(1) => return Ok(()),
            opcode::ERROR => {
                let error = v1::Error::decode(reply.payload).unwrap_or_default();
                bail!("SUBSCRIBE {topic} refused: {}", error.message);
            }
            _ => continue,
        }
    }
}

/// One subscriber of `fanout`: counts deliveries and records their latency.
async fn fanout_reader(mut ws: Ws, shared: Arc<Fanout>, raw: bool, index: usize) {
    while let Some(Ok(message)) = ws.next().await {
        let Message::Binary(bytes) = message else {
            continue;
        };
        let data = match raw {
            true => Some(bytes),
            false => Frame::decode(bytes)
                .ok()
                .filter(|frame| frame.opcode == opcode::DELIVERY)
                .and_then(|frame| v1::Delivery::decode(frame.payload).ok())
                .map(|delivery| delivery.data),
        };
        let now = shared.epoch.elapsed();
        match data.as_deref().and_then(sent_at) {
            Some(sent) => shared
                .stats
                .latencies
                .record(index, now.saturating_sub(sent)),
            None => {
                shared.stats.errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        }
        shared
            .last_delivery_ns
            .fetch_max(now.as_nanos() as u64, Ordering::Relaxed);
        let received = shared.stats.ops.fetch_add(1, Ordering::Relaxed) + 1;
        if received % shared.subs == 0 {
            shared.delivered.notify_one();
        }
    }
    // Readers are stopped by abort at the end; getting here means the
    // server closed the subscriber (or the connection broke).
    shared.stats.fail();
}

/// The publishing side of `fanout`.
enum Publisher {
    /// PUBLISH frames (wsproto) or plain messages to `/pub` (baseline);
    /// a task reads and discards whatever comes back.
    Ws {
        sink: futures_util::stream::SplitSink<Ws, Message>,
        drain: tokio::task::JoinHandle<()>,
        raw: bool,
    },
    /// `POST /api/publish` over one keep-alive connection.
    /// (The server closes a plain HTTP connection after its handshake
    /// timeout, so a closed one is replaced.)
    Http {
        sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        addrs: Vec<SocketAddr>,
        path: String,
        authority: String,
        key: String,
    },
}

impl Publisher {
    async fn connect(
        connector: &Arc<Connector>,
        args: &FanoutArgs,
        shared: Arc<Fanout>,
    ) -> anyhow::Result<Publisher> {
        if args.via == Via::Http {
            let key = args.api_key.clone().context("--via http needs --api-key")?;
            let sender = http_connection(&connector.addrs).await?;
            let http = connector
                .url_with_path("/api/publish")
                .replacen("ws://", "http://", 1);
            let uri: Uri = http.parse()?;
            return Ok(Publisher::Http {
                sender,
                addrs: connector.addrs.clone(),
                path: uri.path().to_owned(),
                authority: uri.authority().map(|a| a.to_string()).unwrap_or_default(),
                key,
            });
        }
        let url = match connector.raw {
            true => connector.url_with_path("/pub"),
            false => connector.url.clone(),
        };
        let ws = connector.connect(&url, 0).await?;
        let (sink, mut stream) = ws.split();
        // Replies are read so the server never sees a stalled publisher;
        // an ERROR (no permission to publish, rate limited) is counted.
        let drain = tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                if let Message::Binary(bytes) = message {
                    if Frame::decode(bytes).is_ok_and(|f| f.opcode == opcode::ERROR) {
                        shared.stats.fail();
                    }
                }
            }
        });
        Ok(Publisher::Ws {
            sink,
            drain,
            raw: connector.raw,
        })
    }

    async fn publish(&mut self, topic: &str, data: Bytes) -> anyhow::Result<()> {
        match self {
            Publisher::Ws {
                sink, raw: true, ..
            } => Ok(sink.send(Message::Binary(data)).await?),
            Publisher::Ws {
                sink, raw: false, ..
            } => {
                let request = v1::Publish {
                    topic: topic.to_owned(),
                    data,
                    opcode: 0,
                };
                let frame = Frame::new(opcode::PUBLISH, request.encode_to_vec());
                Ok(sink.send(Message::Binary(frame.encode())).await?)
            }
            Publisher::Http {
                sender,
                addrs,
                path,
                authority,
                key,
            } => {
                let body = json!({"topic": topic, "data": std::str::from_utf8(&data)?}).to_string();
                let request = || {
                    hyper::Request::post(path.as_str())
                        .header(hyper::header::HOST, authority.as_str())
                        .header(hyper::header::CONTENT_TYPE, "application/json")
                        .header(hyper::header::AUTHORIZATION, format!("Bearer {key}"))
                        .body(Full::new(Bytes::from(body.clone())))
                };
                if sender.ready().await.is_err() {
                    *sender = http_connection(addrs).await?;
                }
                let response = match sender.send_request(request()?).await {
                    // Closed under us before the request went out: it is
                    // safe to send again on a new connection.
                    Err(err) if err.is_canceled() => {
                        *sender = http_connection(addrs).await?;
                        sender.send_request(request()?).await?
                    }
                    result => result?,
                };
                let status = response.status();
                let body = response.into_body().collect().await?.to_bytes();
                if !status.is_success() {
                    bail!(
                        "publish API answered {status}: {}",
                        String::from_utf8_lossy(&body)
                    );
                }
                Ok(())
            }
        }
    }

    async fn close(self) {
        if let Publisher::Ws {
            mut sink, drain, ..
        } = self
        {
            let _ = sink.close().await;
            drain.abort();
        }
    }
}

/// A keep-alive HTTP/1 connection to the first of `addrs` that answers.
async fn http_connection(
    addrs: &[SocketAddr],
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let tcp = TcpStream::connect(addrs).await?;
    tcp.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn connections(
    connector: &Arc<Connector>,
    ramp: u32,
    args: ConnectionsArgs,
    fd_limit: u64,
) -> anyhow::Result<serde_json::Value> {
    let budget = fd_limit.saturating_sub(SPARE_FDS) as usize;
    let conns = args.conns.min(budget);
    if conns < args.conns {
        eprintln!(
            "note: holding {conns} connections, not {}: the open-file limit is {fd_limit} \
             (ulimit -Hn); raise it (and the server's) to go further",
            args.conns
        );
    }
    let mut connector = Connector::clone(connector);
    connector.sources = source_addresses(connector.addrs[0], conns, args.sources);
    // Idle sessions read only pings and the odd control frame.
    connector.config = connector.config.read_buffer_size(4096);
    let connector = Arc::new(connector);

    let rss_before = match args.server_pid {
        Some(pid) => Some(resident_bytes(pid)?),
        None => None,
    };
    let alive = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::new(Notify::new());
    let (holders, _, first_error) = connect_all(conns, ramp, |index| {
        let (connector, alive, stop, stopped) = (
            connector.clone(),
            alive.clone(),
            stop.clone(),
            stopped.clone(),
        );
        async move {
            let ws = connector.connect(&connector.url, index).await?;
            alive.fetch_add(1, Ordering::Relaxed);
            Ok(tokio::spawn(hold(ws, alive, stop, stopped)))
        }
    })
    .await;
    check_connected(conns, holders.len(), first_error)?;
    let progress = Progress::new("holding");
    progress.show(format_args!(
        "{} connections for {:?}",
        holders.len(),
        args.hold
    ));
    tokio::time::sleep(args.hold).await;
    let held = alive.load(Ordering::Relaxed);
    let rss_after = match args.server_pid {
        Some(pid) => Some(resident_bytes(pid)?),
        None => None,
    };
    progress.done();
    stop.store(true, Ordering::Relaxed);
    stopped.notify_waiters();
    for holder in holders {
        let _ = holder.await;
    }

    let per_connection = match (rss_before, rss_after) {
        (Some(before), Some(after)) if held > 0 => {
            Some(after.saturating_sub(before) as f64 / held as f64)
        }
        _ => None,
    };
    Ok(json!({
        "mode": "connections",
        "conns": conns,
        "held": held,
        "failed": conns as u64 - held,
        "errors": conns as u64 - held,
        "fd_limit": fd_limit,
        "rss_before_bytes": rss_before,
        "rss_after_bytes": rss_after,
        "bytes_per_conn": per_connection,
    }))
}

/// Keeps one idle connection open (answering pings) until told to stop.
async fn hold(mut ws: Ws, alive: Arc<AtomicU64>, stop: Arc<AtomicBool>, stopped: Arc<Notify>) {
    loop {
        let stopping = stopped.notified();
        if stop.load(Ordering::Relaxed) {
            break;
        }
        tokio::select! {
            message = ws.next() => match message {
                Some(Ok(Message::Close(_)) | Err(_)) | None => {
                    alive.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
                Some(Ok(_)) => {}
            },
            _ = stopping => break,
        }
    }
    let _ = tokio::time::timeout(GRACE, ws.close(None)).await;
}

/// Source addresses for `conns` connections to `server`: none to let the
/// system choose, or 127.0.0.1..=127.0.0.N past what one address pair's
/// ephemeral ports allow.
fn source_addresses(server: SocketAddr, conns: usize, wanted: Option<u8>) -> Vec<IpAddr> {
    let needed = wanted.map_or(conns.div_ceil(CONNECTIONS_PER_SOURCE), usize::from);
    if needed <= 1 || !server.ip().is_loopback() || !server.is_ipv4() {
        return Vec::new();
    }
    (1..=needed.min(254) as u8)
        .map(|last| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
        .collect()
}

/// Resident memory of process `pid`, from /proc.
fn resident_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read the memory of process {pid}"))?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .context("no VmRSS in /proc/PID/status")?;
    Ok(kib * 1024)
}

/// Counts shared by a run's tasks.
#[derive(Default)]
struct Stats {
    ops: AtomicU64,
    errors: AtomicU64,
    latencies: Latencies,
}

impl Stats {
    /// A connection that ended early.
    fn fail(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Something with a running count, for the progress line.
trait Counted: Send + Sync {
    fn count(&self) -> u64;
}

impl Counted for Stats {
    fn count(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }
}

impl Counted for Fanout {
    fn count(&self) -> u64 {
        self.stats.count()
    }
}

/// Latency histograms, sharded so concurrent connections rarely share a lock.
struct Latencies {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Default for Latencies {
    fn default() -> Latencies {
        let histogram = || Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
        Latencies {
            shards: (0..16).map(|_| Mutex::new(histogram())).collect(),
        }
    }
}

impl Latencies {
    fn record(&self, index: usize, latency: Duration) {
        let nanos = (latency.as_nanos() as u64).clamp(1, 60_000_000_000);
        let mut shard = self.shards[index % self.shards.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let _ = shard.record(nanos);
    }

    /// Adds p50/p90/p99/p99.9 in µs to `report`.
    fn report_into(&self, report: &mut serde_json::Value) {
        let mut all =
            Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
        for shard in &self.shards {
            let _ = all.add(&*shard.lock().unwrap_or_else(|e| e.into_inner()));
        }
        for (key, quantile) in [
            ("p50_us", 0.5),
            ("p90_us", 0.9),
            ("p99_us", 0.99),
            ("p999_us", 0.999),
        ] {
            let micros = match all.is_empty() {
                true => serde_json::Value::Null,
                false => json!(all.value_at_quantile(quantile) as f64 / 1000.0),
            };
            report[key] = micros;
        }
    }
}

/// A one-line progress display on stderr, when it is a terminal.
struct Progress {
    label: &'static str,
    enabled: bool,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    fn new(label: &'static str) -> Progress {
        Progress {
            label,
            enabled: std::io::stderr().is_terminal(),
            ticker: None,
        }
    }

    /// Shows the running count of `counted` once a second for `duration`.
    fn ticking(label: &'static str, counted: Arc<dyn Counted>, duration: Duration) -> Progress {
        let mut progress = Progress::new(label);
        if progress.enabled {
            progress.ticker = Some(tokio::spawn(async move {
                let started = Instant::now();
                let mut ticks = tokio::time::interval(Duration::from_secs(1));
                loop {
                    ticks.tick().await;
                    eprint!(
                        "\r{label}: {:.0}/{:.0} s, {} so far ",
                        started.elapsed().as_secs_f64().min(duration.as_secs_f64()),
                        duration.as_secs_f64(),
                        counted.count()
                    );
                }
            }));
        }
        progress
    }

    fn show(&self, what: std::fmt::Arguments<'_>) {
        if self.enabled {
            eprint!("\r{}: {what} ", self.label);
        }
    }

    fn done(&self) {
        if let Some(ticker) = &self.ticker {
            ticker.abort();
        }
        if self.enabled {
            eprint!("\r\x1b[2K");
        }
    }
}

fn print_summary(report: &serde_json::Value) {
    let number = |key: &str| report[key].as_f64().unwrap_or(f64::NAN);
    let latency = || {
        format!(
            "latency p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs",
            number("p50_us"),
            number("p90_us"),
            number("p99_us"),
            number("p999_us")
        )
    };
    match report["mode"].as_str() {
        Some("echo") => println!(
            "echo: {} connections × depth {}, {} B payloads, {:.1} s\n  {:.0} round trips/s ({} in all, {} errors)\n  {}",
            report["connected"], report["depth"], report["size"], number("duration_s"),
            number("ops_per_s"), report["ops"], report["errors"], latency()
        ),
        Some("fanout") => println!(
            "fanout: {} subscribers, {} B messages, rate {}, {:.1} s\n  {:.0} deliveries/s; {} published, {} expected, {} received, {} lost, {} errors\n  {}",
            report["connected"], report["size"],
            report["rate"].as_f64().map_or("max".to_owned(), |r| format!("{r}/s")),
            number("duration_s"), number("deliveries_per_s"), report["published"],
            report["expected"], report["received"], report["lost"], report["errors"], latency()
        ),
        _ => {
            println!(
                "connections: {} of {} held (open-file limit {})",
                report["held"], report["conns"], report["fd_limit"]
            );
            if let Some(bytes) = report["bytes_per_conn"].as_f64() {
                println!(
                    "  server RSS {} → {} bytes: {:.0} bytes per connection",
                    report["rss_before_bytes"], report["rss_after_bytes"], bytes
                );
            }
        }
    }
}
