//! `bench fanout`: one publisher, many subscribers of one topic;
//! deliveries a second, losses and publish-to-delivery latency.
//!
//! Subscribers may be spread over several servers (`--sub-url`, round
//! robin) and the publisher put on another (`--pub-url`), which is how a
//! cluster is measured: subscribers on two nodes, publishing on a third.
//! The report then counts deliveries and losses per subscriber URL, so a
//! node that receives nothing shows up as that node's loss.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use bytes::{BufMut, Bytes, BytesMut};
use clap::{Args, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use serde_json::json;
use tokio::{sync::Notify, task::JoinSet};
use tokio_tungstenite::tungstenite::Message;
use wsproto::{opcode, proto::v1, Frame};
use wsproto_client::http::KeepAlive;

use super::{
    connector::{check_connected, connect_all, next_frame, Connector, Ws},
    stats::{Counted, CpuClock, Progress, Stats},
};

#[derive(Args)]
#[command(next_help_heading = "Workload")]
pub(super) struct FanoutArgs {
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
    /// Servers the subscribers connect to, spread round robin (repeat the
    /// option or separate URLs with commas). Default: --url (its `/sub`
    /// path with --raw).
    #[arg(
        long = "sub-url",
        value_name = "URL",
        value_delimiter = ',',
        help_heading = "Servers"
    )]
    sub_urls: Vec<String>,
    /// Where the publisher publishes: `ws://…` for PUBLISH frames (the
    /// baseline's `/pub` with --raw), `http://…/api/publish` for the HTTP
    /// publish API. Default: --url (its `/pub` path with --raw, its
    /// `/api/publish` with --via http).
    #[arg(long, value_name = "URL", help_heading = "Servers")]
    pub_url: Option<String>,
    /// Topic to publish to (the server must allow clients to publish there,
    /// e.g. `--client-publish 'bench.#'`, unless --via http).
    #[arg(long, default_value = "bench.fanout")]
    topic: String,
    /// How the publisher publishes: PUBLISH frames or the HTTP publish API
    /// (an `http://` --pub-url implies `http`).
    #[arg(long, value_enum, default_value_t = Via::Ws, help_heading = "Servers")]
    via: Via,
    /// Key of the HTTP publish API (with --via http).
    #[arg(
        long,
        env = "WSPROTO_API_KEY",
        hide_env_values = true,
        help_heading = "Servers"
    )]
    api_key: Option<String>,
    /// Process id of the server, to report the CPU time it used per
    /// operation (and the share of a core it had).
    #[arg(long, help_heading = "Measurement")]
    server_pid: Option<u32>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Via {
    Ws,
    Http,
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

pub(super) async fn run(
    connector: &Arc<Connector>,
    ramp: u32,
    args: FanoutArgs,
) -> anyhow::Result<serde_json::Value> {
    let pub_url = publish_url(connector, &args)?;
    let sub_urls = match args.sub_urls.is_empty() {
        true => vec![match connector.raw {
            true => connector.url_with_path("/sub"),
            false => connector.url.clone(),
        }],
        false => args.sub_urls.clone(),
    };
    let mut sub_connectors = Vec::with_capacity(sub_urls.len());
    for url in &sub_urls {
        sub_connectors.push(Arc::new(connector.to(url).await?));
    }
    let topic = args.topic.clone();
    let (subscribers, failed, first_error) = connect_all(args.subs, ramp, |index| {
        let group = index % sub_connectors.len();
        let (connector, topic) = (sub_connectors[group].clone(), topic.clone());
        async move {
            let mut ws = connector.connect(&connector.url, index).await?;
            if !connector.raw {
                subscribe(&mut ws, &topic).await?;
            }
            Ok((group, ws))
        }
    })
    .await;
    check_connected(args.subs, subscribers.len(), first_error)?;
    let subs = subscribers.len() as u64;
    let mut subs_by_url = vec![0u64; sub_urls.len()];
    for (group, _) in &subscribers {
        subs_by_url[*group] += 1;
    }
    // The baseline subscribes a connection just after its handshake.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let shared = Arc::new(Fanout {
        stats: Stats::default(),
        subs,
        epoch: Instant::now(),
        delivered: Notify::new(),
        last_delivery_ns: AtomicU64::new(0),
        received_by_url: sub_urls.iter().map(|_| AtomicU64::new(0)).collect(),
    });
    let mut readers = JoinSet::new();
    for (index, (group, ws)) in subscribers.into_iter().enumerate() {
        readers.spawn(fanout_reader(
            ws,
            shared.clone(),
            connector.raw,
            index,
            group,
        ));
    }

    let mut publisher =
        Publisher::connect(connector, &pub_url, args.api_key.as_deref(), shared.clone()).await?;
    let progress = Progress::ticking("fanout", shared.clone(), args.duration);
    let cpu = CpuClock::start(args.server_pid)?;
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
    let cpu_used = cpu.stop(shared.stats.ops.load(Ordering::Relaxed));
    progress.done();
    readers.abort_all();
    publisher.close().await;

    let received = shared.stats.ops.load(Ordering::Relaxed);
    let last_delivery = Duration::from_nanos(shared.last_delivery_ns.load(Ordering::Relaxed));
    let by_url: Vec<serde_json::Value> = sub_urls
        .iter()
        .zip(&subs_by_url)
        .zip(&shared.received_by_url)
        .map(|((url, &subs), received)| {
            let received = received.load(Ordering::Relaxed);
            json!({
                "url": url,
                "subs": subs,
                "received": received,
                "lost": (published * subs).saturating_sub(received),
            })
        })
        .collect();
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
        "pub_url": pub_url,
        "by_url": by_url,
    });
    shared.stats.latencies.report_into(&mut report);
    for (key, value) in cpu_used {
        report[key.as_str()] = value;
    }
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
    /// Deliveries to the subscribers of each --sub-url, in order.
    received_by_url: Vec<AtomicU64>,
}

/// Where `args` says to publish: --pub-url, or what --url and --via imply.
fn publish_url(connector: &Connector, args: &FanoutArgs) -> anyhow::Result<String> {
    let url = match (&args.pub_url, args.via) {
        (Some(url), _) => url.clone(),
        (None, Via::Http) => connector
            .url_with_path("/api/publish")
            .replacen("ws://", "http://", 1),
        (None, Via::Ws) if connector.raw => connector.url_with_path("/pub"),
        (None, Via::Ws) => connector.url.clone(),
    };
    let http = url.starts_with("http://");
    if args.via == Via::Http && !http {
        bail!("--via http needs an http:// --pub-url, got {url}");
    }
    if connector.raw && http {
        bail!("publishing over HTTP needs a wsproto server (the baseline has no publish API)");
    }
    Ok(url)
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
        ..Default::default()
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

/// The one field of a `wsproto.v1.Delivery` the load generator reads; prost
/// skips the others. Decoding the whole message (topic, sender, epoch:
/// three allocations) made the load generator, not the server, the limit
/// of a fan-out at 10,000 subscribers.
#[derive(Clone, PartialEq, prost::Message)]
struct DeliveryData {
    #[prost(bytes = "bytes", tag = "6")]
    data: Bytes,
}

/// One subscriber of `fanout`: counts deliveries and records their latency.
async fn fanout_reader(mut ws: Ws, shared: Arc<Fanout>, raw: bool, index: usize, group: usize) {
    while let Some(Ok(message)) = ws.next().await {
        let Message::Binary(bytes) = message else {
            continue;
        };
        let data = match raw {
            true => Some(bytes),
            false => Frame::decode(bytes)
                .ok()
                .filter(|frame| frame.opcode == opcode::DELIVERY)
                .and_then(|frame| DeliveryData::decode(frame.payload).ok())
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
        shared.received_by_url[group].fetch_add(1, Ordering::Relaxed);
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
    Http { connection: KeepAlive, key: String },
}

impl Publisher {
    /// Connects to `url` (from [`publish_url`]): the HTTP publish API for
    /// `http://`, a WebSocket otherwise.
    async fn connect(
        connector: &Connector,
        url: &str,
        api_key: Option<&str>,
        shared: Arc<Fanout>,
    ) -> anyhow::Result<Publisher> {
        if url.starts_with("http://") {
            let key = api_key.context("publishing over HTTP needs --api-key")?;
            let connection = KeepAlive::connect(url).await?;
            return Ok(Publisher::Http {
                connection,
                key: key.to_owned(),
            });
        }
        let connector = connector.to(url).await?;
        let ws = connector.connect(url, 0).await?;
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
            Publisher::Http { connection, key } => {
                let body = json!({"topic": topic, "data": std::str::from_utf8(&data)?}).to_string();
                let (status, body) = connection.post_json(Some(key), &body).await?;
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

impl Counted for Fanout {
    fn count(&self) -> u64 {
        self.stats.count()
    }
}
