//! A reconnect storm: every client of a restarted server reconnects at
//! once, all from one address (a NAT, an office, a proxy without
//! --trusted-proxy). With the default limits and the shipped clients'
//! back-off (full jitter), all of them get in; those refused for a moment
//! are told so with an HTTP status and `Retry-After`, never a silent drop.

mod common;

use std::{
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use common::{config, TestServer};
use wsproto::Config;
use wsproto_client::{backoff::Backoff, Client, ClientError};

/// Clients in the storm: past the old per-address session cap (1,000) and
/// handshake cap (256). 6,000 descriptors in one process (both ends).
const CLIENTS: usize = 3000;

/// What went wrong for the first few clients that were not answered.
static UNANSWERED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Connects with back-off until it is in; counts refusals by kind.
async fn connect_with_backoff(url: String, refused: Arc<[AtomicU32; 3]>) -> Client {
    let mut backoff = Backoff::default();
    loop {
        let error = match Client::connect(&url).await {
            Ok(mut client) => match client.welcome().await {
                Ok(_) => return client,
                Err(err) => err,
            },
            Err(err) => err,
        };
        let kind = match error {
            ClientError::Refused { status: 429, .. } => 0,
            ClientError::Refused { status: 503, .. } => 1,
            // Anything else is what the storm must not produce: a
            // connection dropped or reset without an answer.
            other => {
                let mut seen = UNANSWERED.lock().unwrap();
                if seen.len() < 5 {
                    seen.push(other.to_string());
                }
                2
            }
        };
        refused[kind].fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_from_one_address_reconnecting_at_once_all_get_in() {
    // Both ends of every connection are in this process.
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap();
    assert!(
        limit >= 2 * CLIENTS as u64 + 100,
        "open-file limit {limit} is too low for {CLIENTS} connections (ulimit -Hn)"
    );
    // The defaults that matter in a storm, as shipped.
    let server = TestServer::start(Config {
        shutdown_timeout: Duration::from_secs(2),
        ..Config {
            rate_limit: 0.0,
            ..config()
        }
    })
    .await;
    let defaults = Config::default();
    assert!(defaults.max_connections_per_ip >= 3000);
    assert!(defaults.max_handshakes_per_ip < defaults.max_handshakes);

    let started = std::time::Instant::now();
    let refused = Arc::new([AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0)]);
    let storm = futures_util::future::join_all(
        (0..CLIENTS).map(|_| tokio::spawn(connect_with_backoff(server.url(), refused.clone()))),
    );
    // A bound so a regression fails instead of hanging.
    let clients = tokio::time::timeout(Duration::from_secs(120), storm)
        .await
        .expect("every client got in");
    let took = started.elapsed();
    assert_eq!(clients.iter().filter(|c| c.is_ok()).count(), CLIENTS);
    assert_eq!(server.hub.len(), CLIENTS);
    let [too_many, unavailable, unanswered] = refused.each_ref().map(|c| c.load(Ordering::Relaxed));
    eprintln!("{CLIENTS} clients in after {took:?}; refused on the way: {too_many} × 429, {unavailable} × 503, {unanswered} unanswered");
    assert_eq!(
        unanswered,
        0,
        "every refusal was an HTTP answer; first errors: {:?}",
        UNANSWERED.lock().unwrap()
    );
    // What the defaults promise for a storm: measured here under 2 s in a
    // debug build alone, and once over 10 s while the whole suite shared
    // two cores. Limits that kept turning clients away would show as
    // several back-off windows of up to 10 s each, so 20 s still catches
    // them.
    assert!(
        took <= Duration::from_secs(20),
        "{CLIENTS} clients from one address took {took:?} to get in; the defaults should admit them within 20 s"
    );
    drop(clients);
    server.wait_for_sessions(0).await;
}
