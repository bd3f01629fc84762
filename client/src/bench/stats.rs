//! What a run counts and shows: operation and error counts, latency
//! histograms, the progress line and the printed summary.

use std::{
    io::IsTerminal,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::json;

/// Counts shared by a run's tasks.
#[derive(Default)]
pub(super) struct Stats {
    pub(super) ops: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) latencies: Latencies,
}

impl Stats {
    /// A connection that ended early.
    pub(super) fn fail(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Something with a running count, for the progress line.
pub(super) trait Counted: Send + Sync {
    fn count(&self) -> u64;
}

impl Counted for Stats {
    fn count(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }
}

/// Latency histograms, sharded so concurrent connections rarely share a lock.
pub(super) struct Latencies {
    shards: Vec<Mutex<Histogram<u64>>>,
}

/// Significant digits the latencies keep: quantiles within 1 %. Three
/// digits made each shard ~225 KB, and a fan-out's spread of latencies
/// missed the cache on most records (11 % of the load generator's time at
/// 10,000 subscribers, when the load generator is what limits the rate).
const PRECISION: u8 = 2;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, PRECISION).expect("valid bounds")
}

impl Default for Latencies {
    fn default() -> Latencies {
        Latencies {
            shards: (0..16).map(|_| Mutex::new(histogram())).collect(),
        }
    }
}

impl Latencies {
    pub(super) fn record(&self, index: usize, latency: Duration) {
        let nanos = (latency.as_nanos() as u64).clamp(1, 60_000_000_000);
        let mut shard = self.shards[index % self.shards.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let _ = shard.record(nanos);
    }

    /// Adds p50/p90/p99/p99.9 in µs to `report`.
    pub(super) fn report_into(&self, report: &mut serde_json::Value) {
        let mut all = histogram();
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
pub(super) struct Progress {
    label: &'static str,
    enabled: bool,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    pub(super) fn new(label: &'static str) -> Progress {
        Progress {
            label,
            enabled: std::io::stderr().is_terminal(),
            ticker: None,
        }
    }

    /// Shows the running count of `counted` once a second for `duration`.
    pub(super) fn ticking(
        label: &'static str,
        counted: Arc<dyn Counted>,
        duration: Duration,
    ) -> Progress {
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

    pub(super) fn show(&self, what: std::fmt::Arguments<'_>) {
        if self.enabled {
            eprint!("\r{}: {what} ", self.label);
        }
    }

    pub(super) fn done(&self) {
        if let Some(ticker) = &self.ticker {
            ticker.abort();
        }
        if self.enabled {
            eprint!("\r\x1b[2K");
        }
    }
}

pub(super) fn print_summary(report: &serde_json::Value) {
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
        Some("fanout") => {
            println!(
                "fanout: {} subscribers, {} B messages, rate {}, {:.1} s\n  {:.0} deliveries/s; {} published, {} expected, {} received, {} lost, {} errors\n  {}",
                report["connected"], report["size"],
                report["rate"].as_f64().map_or("max".to_owned(), |r| format!("{r}/s")),
                number("duration_s"), number("deliveries_per_s"), report["published"],
                report["expected"], report["received"], report["lost"], report["errors"], latency()
            );
            let by_url = report["by_url"].as_array().map_or(&[][..], Vec::as_slice);
            if by_url.len() > 1 {
                for group in by_url {
                    println!(
                        "  {}: {} subscribers, {} received, {} lost",
                        group["url"].as_str().unwrap_or("?"),
                        group["subs"],
                        group["received"],
                        group["lost"]
                    );
                }
            }
        }
        Some("recovery") => println!(
            "recovery: {} devices, {} messages at {}/s, {} reconnects\n  {} delivered, {} announced as gaps, {} silently missing, {} duplicated, {} reordered\n  caught up after a drop: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            report["devices"], report["published"], report["rate"], report["reconnects"],
            report["delivered"], report["announced"], report["silently_missing"],
            report["duplicated"], report["reordered"],
            number("recovery_p50_ms"), number("recovery_p99_ms"), number("recovery_max_ms")
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

/// Clock ticks a second in /proc/PID/stat: Linux's USER_HZ, 100 on every
/// mainstream architecture whatever the kernel's own tick rate.
const USER_HZ: f64 = 100.0;

/// CPU time used over a run by the server (with `--server-pid`) and by this
/// load generator: what an operation costs the server even when something
/// else limited the rate, and whether the load generator was that limit.
pub(super) struct CpuClock {
    server: Option<(u32, f64)>,
    client: f64,
    started: Instant,
}

impl CpuClock {
    /// Starts measuring now.
    ///
    /// # Errors
    /// When the server's /proc entry cannot be read (no such process).
    pub(super) fn start(server_pid: Option<u32>) -> anyhow::Result<CpuClock> {
        let server = match server_pid {
            Some(pid) => Some((pid, cpu_seconds(pid)?)),
            None => None,
        };
        Ok(CpuClock {
            server,
            client: cpu_seconds(std::process::id())?,
            started: Instant::now(),
        })
    }

    /// The CPU time used since the start, `ops` operations having been done:
    /// `client_cpu_s`, `client_cpu_share` (of the wall time), and with a
    /// server, `server_cpu_s`, `server_cpu_share` and `server_cpu_us_per_op`.
    /// A server that is gone is left out.
    pub(super) fn stop(&self, ops: u64) -> serde_json::Map<String, serde_json::Value> {
        let wall = self.started.elapsed().as_secs_f64();
        let mut used = serde_json::Map::new();
        if let Ok(now) = cpu_seconds(std::process::id()) {
            let seconds = now - self.client;
            used.insert("client_cpu_s".into(), json!(seconds));
            used.insert("client_cpu_share".into(), json!(seconds / wall));
        }
        if let Some((pid, before)) = self.server {
            if let Ok(now) = cpu_seconds(pid) {
                let seconds = now - before;
                used.insert("server_cpu_s".into(), json!(seconds));
                used.insert("server_cpu_share".into(), json!(seconds / wall));
                if ops > 0 {
                    used.insert(
                        "server_cpu_us_per_op".into(),
                        json!(seconds * 1e6 / ops as f64),
                    );
                }
            }
        }
        used
    }
}

/// User plus system CPU time of process `pid` (all its threads), from /proc.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read the CPU time of process {pid}"))?;
    // The command name, in parentheses, may hold spaces: count fields
    // after its closing parenthesis (utime and stime are fields 14 and 15).
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let mut fields = after_name.split_whitespace().skip(11);
    let mut ticks = || fields.next().and_then(|f| f.parse::<u64>().ok());
    match (ticks(), ticks()) {
        (Some(user), Some(system)) => Ok((user + system) as f64 / USER_HZ),
        _ => anyhow::bail!("unexpected /proc/{pid}/stat: {stat:?}"),
    }
}
