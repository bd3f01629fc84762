//! `wsproto-client bench`: a load generator, both for sizing a deployment
//! and for comparing wsproto with the references in `benches/baseline`
//! (plain tokio-tungstenite, fastwebsockets) on the same workloads.
//!
//! - `echo`: N connections, each keeping D frames in flight; round trips/s
//!   and latency percentiles.
//! - `fanout`: N subscribers on a topic (spread over one or several
//!   servers) and one publisher; deliveries/s, losses (per server) and
//!   end-to-end latency.
//!
//! With `--server-pid`, `echo` and `fanout` also report the server's CPU
//! time per operation and the load generator's share of a core, so a run
//! shows its cost even when the load generator, not the server, set the pace.
//! - `connections`: N idle sessions held; with `--server-pid`, the server's
//!   memory per connection.
//! - `recovery`: devices that keep dropping their connections while a
//!   backend publishes; what recovery loses, doubles or announces (checked
//!   per device), and how long it takes.
//!
//! Connections are opened at a ramp so thousands of them do not overflow
//! the server's accept backlog. Latencies go into HdrHistograms (recorded
//! in nanoseconds, reported in µs). `--json` prints one line per run, which
//! `benches/compare.sh` turns into the ratio tables in the README.
//!
//! Layout: [`connector`] opens connections (addresses, ramp, WELCOME);
//! [`echo`], [`fanout`] and [`connections`] are the three modes; [`stats`]
//! counts, keeps the latency histograms and prints the summary.

mod connections;
mod connector;
mod echo;
mod fanout;
mod recovery;
mod stats;

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Args, Subcommand};

use connector::Connector;
use stats::print_summary;

/// Longest wait for a write or a close once a run's time is up.
pub(super) const GRACE: Duration = Duration::from_secs(5);

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    mode: Mode,

    /// The server is a plain reference (benches/baseline: `baseline-server`
    /// or `fastwebsockets-server`): no WELCOME, plain echo, and fan-out
    /// through `/sub` and `/pub` paths instead of topics.
    #[arg(long, global = true, help_heading = "Servers")]
    raw: bool,

    /// Print one JSON line instead of a summary.
    #[arg(long, global = true, help_heading = "Output")]
    json: bool,

    /// New connections a second while connecting.
    #[arg(long, global = true, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Load generator")]
    ramp: u32,
}

#[derive(Subcommand)]
enum Mode {
    /// Round trips: every connection keeps --depth frames in flight.
    Echo(echo::EchoArgs),
    /// One publisher, --subs subscribers of one topic.
    Fanout(fanout::FanoutArgs),
    /// Hold idle sessions and report how many held (and the server's RSS).
    Connections(connections::ConnectionsArgs),
    /// Devices that keep dropping their connections while a backend
    /// publishes: what recovery loses, doubles or announces, and how fast.
    Recovery(recovery::RecoveryArgs),
}

/// Runs one benchmark against `url`; `false` when it saw errors.
pub async fn run(url: &str, token: Option<&str>, args: BenchArgs) -> anyhow::Result<bool> {
    // Every connection costs one descriptor here (and one in the server).
    let fd_limit =
        rlimit::increase_nofile_limit(u64::MAX).context("cannot raise the open-file limit")?;
    let connector = Arc::new(Connector::new(url, token, args.raw).await?);
    let report = match args.mode {
        Mode::Echo(mode) => echo::run(&connector, args.ramp, mode).await?,
        Mode::Fanout(mode) => fanout::run(&connector, args.ramp, mode).await?,
        Mode::Connections(mode) => connections::run(&connector, args.ramp, mode, fd_limit).await?,
        Mode::Recovery(mode) => recovery::run(&connector, mode).await?,
    };
    let ok =
        report["errors"].as_u64().unwrap_or(0) == 0 && report["lost"].as_u64().unwrap_or(0) == 0;
    match args.json {
        true => println!("{report}"),
        false => print_summary(&report),
    }
    Ok(ok)
}
