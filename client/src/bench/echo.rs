//! `bench echo`: round trips with a fixed number of frames in flight.

use std::{
    collections::VecDeque,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use bytes::Bytes;
use clap::Args;
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::json;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use wsproto::{opcode, Frame};

use super::{
    connector::{check_connected, connect_all, Connector, Ws},
    stats::{CpuClock, Progress, Stats},
    GRACE,
};

#[derive(Args)]
#[command(next_help_heading = "Workload")]
pub(super) struct EchoArgs {
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
    /// Process id of the server, to report the CPU time it used per
    /// operation (and the share of a core it had).
    #[arg(long, help_heading = "Measurement")]
    server_pid: Option<u32>,
}

pub(super) async fn run(
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
    let cpu = CpuClock::start(args.server_pid)?;
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
    let cpu_used = cpu.stop(stats.ops.load(Ordering::Relaxed));
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
    for (key, value) in cpu_used {
        report[key.as_str()] = value;
    }
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
