//! `bench connections`: idle sessions held open, and the server's
//! resident memory per connection.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context;
use clap::Args;
use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use super::{
    connector::{check_connected, connect_all, source_addresses, Connector, Ws},
    stats::Progress,
    GRACE,
};

/// Descriptors kept for everything else when sizing `connections` runs.
const SPARE_FDS: u64 = 100;

#[derive(Args)]
#[command(next_help_heading = "Workload")]
pub(super) struct ConnectionsArgs {
    /// Idle connections to open (capped by the open-file limit, which is
    /// raised to its hard maximum first).
    #[arg(long, default_value_t = 1000)]
    conns: usize,
    /// How long to hold them once all are open.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// Process id of the server, to report its resident memory per connection.
    #[arg(long, help_heading = "Measurement")]
    server_pid: Option<u32>,
    /// Source addresses 127.0.0.1..=127.0.0.N to spread connections over
    /// (default: one per 25,000 connections, for a loopback server).
    #[arg(long, help_heading = "Load generator")]
    sources: Option<u8>,
}

pub(super) async fn run(
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
