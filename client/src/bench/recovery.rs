//! `bench recovery`: devices that keep losing their connections (as phones
//! changing networks do) while a backend publishes at a steady rate. Each
//! device is a [`Subscriber`]: it reconnects with back-off, recovers what
//! it missed from the server's history and drops duplicates. A
//! [`checker`](wsproto_client::checker) counts per device what was lost,
//! doubled, reordered, or missing without a GAP notice; the recovery time
//! is how long after losing its connection a device had every message
//! published before it was back.
//!
//! The server needs history for the topic and the publish API, e.g.
//! `wsproto-server --history 'bench.#=10000' --api-key KEY`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;
use wsproto_client::{
    backoff::Backoff,
    checker::{accepted_ranges, follow, Report, Shared},
    http::KeepAlive,
    Subscriber,
};

use super::connector::Connector;

#[derive(Args)]
#[command(next_help_heading = "Workload")]
pub(super) struct RecoveryArgs {
    /// Devices subscribed to the topic.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Messages a second the backend publishes.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    rate: u64,
    /// How long to publish.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Each device drops its connection at a random moment of every such
    /// interval.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    drop_every: Duration,
    /// Topic to publish to (it needs a --history policy on the server).
    #[arg(long, default_value = "bench.recovery")]
    topic: String,
    /// Key of the HTTP publish API.
    #[arg(
        long,
        env = "WSPROTO_API_KEY",
        hide_env_values = true,
        help_heading = "Servers"
    )]
    api_key: Option<String>,
}

pub(super) async fn run(
    connector: &Connector,
    args: RecoveryArgs,
) -> anyhow::Result<serde_json::Value> {
    if connector.raw {
        bail!("bench recovery needs a wsproto server (not --raw)");
    }
    let api = connector
        .url
        .replacen("ws://", "http://", 1)
        .split_once("/ws")
        .map_or_else(
            || connector.url.clone(),
            |(base, _)| format!("{base}/api/publish"),
        );
    let stream = format!("t:{}", args.topic);
    let shared = Shared::default();
    let mut devices = Vec::with_capacity(args.devices);
    for _ in 0..args.devices {
        let subscriber =
            Subscriber::new(connector.url.clone(), vec![args.topic.clone()], vec![]).with_backoff(
                Backoff::new(Duration::from_millis(50), Duration::from_secs(2)),
            );
        let drop_every = Some(args.drop_every);
        let device = follow(subscriber, stream.clone(), shared.clone(), drop_every);
        devices.push(tokio::spawn(device));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while shared.ready.load(std::sync::atomic::Ordering::Relaxed) < args.devices as u64 {
        if Instant::now() > deadline {
            bail!("devices did not all subscribe within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut publisher = KeepAlive::connect(&api)
        .await
        .with_context(|| format!("cannot reach the publish API at {api}"))?;
    let mut ticks = tokio::time::interval(Duration::from_secs(1).div_f64(args.rate as f64));
    let started = Instant::now();
    let mut errors = 0u64;
    while started.elapsed() < args.duration {
        ticks.tick().await;
        let body = json!({"topic": args.topic, "data": started.elapsed().as_millis().to_string()});
        match publisher
            .post_json(args.api_key.as_deref(), &body.to_string())
            .await
        {
            Ok((status, answer)) if status.is_success() => {
                let answer: serde_json::Value = serde_json::from_slice(&answer)?;
                let epoch = answer["epoch"].as_str().unwrap_or_default().to_owned();
                let seq = answer["seq"].as_u64().unwrap_or(0);
                shared.accepted.lock().unwrap().push((epoch, seq));
            }
            Ok((status, answer)) => bail!(
                "the publish API answered {status}: {}",
                String::from_utf8_lossy(&answer)
            ),
            Err(_) => errors += 1,
        }
    }
    // Let the last reconnects catch up.
    tokio::time::sleep(args.drop_every.max(Duration::from_secs(2))).await;
    shared
        .done
        .store(true, std::sync::atomic::Ordering::Relaxed);

    let published = accepted_ranges(&shared.accepted.lock().unwrap());
    let mut report = Report::default();
    let mut catch_ups = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut reconnects = 0;
    for device in devices {
        let device = device.await?;
        report.add(device.checker.report(&stream, &published));
        reconnects += device.reconnects;
        for took in device.catch_ups {
            catch_ups.record(took.as_micros() as u64)?;
        }
    }
    let ms = |q: f64| catch_ups.value_at_quantile(q) as f64 / 1000.0;
    Ok(json!({
        "mode": "recovery",
        "devices": args.devices,
        "rate": args.rate,
        "duration_s": args.duration.as_secs_f64(),
        "published": shared.accepted.lock().unwrap().len(),
        "delivered": report.delivered,
        "duplicated": report.duplicated,
        "reordered": report.reordered,
        "announced": report.announced,
        "silently_missing": report.silently_missing,
        "lost": report.silently_missing + report.duplicated + report.reordered,
        "reconnects": reconnects,
        "recoveries": catch_ups.len(),
        "recovery_p50_ms": ms(0.5),
        "recovery_p99_ms": ms(0.99),
        "recovery_max_ms": catch_ups.max() as f64 / 1000.0,
        "errors": errors,
    }))
}
