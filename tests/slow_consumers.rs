//! Clients that stop reading, under each queue policy: everyone else still
//! gets every message, the stuck client's queue stays bounded, and the
//! policy's outcome is visible.

mod common;

use std::time::{Duration, Instant};

use common::{config, TestServer};
use wsproto::{proto::v1, queue::SessionQueue, Config};
use wsproto_client::Client;

const QUEUE: usize = 64;
/// Enough bytes to fill the stuck client's socket buffers many times over.
const MESSAGES: u64 = 3000;
const SIZE: usize = 8 * 1024;

async fn start() -> TestServer {
    TestServer::start(Config {
        send_queue: QUEUE,
        write_timeout: Duration::from_secs(60),
        shutdown_timeout: Duration::from_millis(500),
        client_publish: vec!["#".parse().unwrap()],
        topic_policies: vec![
            ("feed.drop".parse().unwrap(), "drop-oldest".parse().unwrap()),
            (
                "feed.conflate".parse().unwrap(),
                "conflate".parse().unwrap(),
            ),
            ("alarm.#".parse().unwrap(), "critical".parse().unwrap()),
        ],
        ..config()
    })
    .await
}

/// A subscriber that reads in its own task until it has seen sequence
/// number `last`; resolves to every sequence number it got, in order, and
/// the client (still connected).
fn healthy_reader(mut client: Client, last: u64) -> tokio::task::JoinHandle<(Vec<u64>, Client)> {
    tokio::spawn(async move {
        let mut seqs = Vec::new();
        while seqs.last() != Some(&last) {
            seqs.push(client.delivery(Duration::from_secs(30)).await.unwrap().seq);
        }
        (seqs, client)
    })
}

fn every(count: u64) -> Vec<u64> {
    (1..=count).collect()
}

/// Publishes `count` messages to `topic`, one round trip each.
async fn publish_many(publisher: &mut Client, topic: &str, count: u64) {
    let data = vec![7u8; SIZE];
    for _ in 0..count {
        publisher.publish(topic, data.clone()).await.unwrap();
    }
}

fn stuck_queue(server: &TestServer) -> SessionQueue {
    let id = server
        .hub
        .sessions_of_user("stuck")
        .pop()
        .expect("stuck client connected");
    server.hub.queue_of(&id).expect("stuck client connected")
}

/// Reads deliveries until one of `topic` with sequence number `last`.
async fn drain(client: &mut Client, topic: &str, last: u64) -> Vec<v1::Delivery> {
    let mut deliveries = Vec::new();
    loop {
        let delivery = client.delivery(Duration::from_secs(30)).await.unwrap();
        let done = delivery.topic == topic && delivery.seq == last;
        deliveries.push(delivery);
        if done {
            return deliveries;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_policy_closes_the_stuck_client_and_the_rest_get_everything() {
    let server = start().await;
    let _stuck = server.client_with("user=stuck&subscribe=feed.strict").await;
    let healthy = healthy_reader(server.client_with("subscribe=feed.strict").await, MESSAGES);
    let mut publisher = server.client().await;

    let started = Instant::now();
    publish_many(&mut publisher, "feed.strict", MESSAGES).await;
    let (seqs, _healthy) = healthy.await.unwrap();
    assert_eq!(
        seqs,
        every(MESSAGES),
        "the healthy subscriber got everything"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    // Only the stuck one is gone.
    server.wait_for_sessions(2).await;
    assert!(server.hub.sessions_of_user("stuck").is_empty());
    assert_eq!(server.node.counter_snapshot().closed_slow_consumer, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_keeps_the_stuck_client_with_a_bounded_queue() {
    let server = start().await;
    let mut stuck = server.client_with("user=stuck&subscribe=feed.drop").await;
    let healthy = healthy_reader(server.client_with("subscribe=feed.drop").await, MESSAGES);
    let mut publisher = server.client().await;

    publish_many(&mut publisher, "feed.drop", MESSAGES).await;
    let (seqs, _healthy) = healthy.await.unwrap();
    assert_eq!(
        seqs,
        every(MESSAGES),
        "the healthy subscriber got everything"
    );

    let queue = stuck_queue(&server);
    assert!(queue.len() <= QUEUE);
    let dropped = queue.dropped();
    assert!(
        dropped > 0,
        "nothing was dropped; the test did not fill the socket"
    );

    // Once it reads again, it gets what was kept: the newest, with gaps
    // where the oldest were dropped.
    let deliveries = drain(&mut stuck, "feed.drop", MESSAGES).await;
    assert_eq!(deliveries.len() as u64 + dropped, MESSAGES);
    assert!(deliveries.windows(2).all(|w| w[0].seq < w[1].seq));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflate_keeps_only_the_newest_pending_message() {
    let server = start().await;
    let mut stuck = server
        .client_with("user=stuck&subscribe=feed.conflate")
        .await;
    let mut healthy = server.client_with("subscribe=feed.conflate").await;
    let mut publisher = server.client().await;

    // A reader that keeps up gets every value: conflation only merges
    // values that are pending at the same moment. (How often that happens
    // under a fast publisher depends on scheduling, not on the policy.)
    let data = vec![7u8; SIZE];
    for seq in 1..=MESSAGES {
        publisher
            .publish("feed.conflate", data.clone())
            .await
            .unwrap();
        let delivery = healthy.delivery(Duration::from_secs(30)).await.unwrap();
        assert_eq!(delivery.seq, seq, "the healthy reader got every value");
    }

    let queue = stuck_queue(&server);
    assert!(queue.len() <= 1, "one pending message per conflated topic");
    let dropped = queue.dropped();
    assert!(dropped > 0);
    // The newest value arrives.
    let deliveries = drain(&mut stuck, "feed.conflate", MESSAGES).await;
    assert_eq!(deliveries.len() as u64 + dropped, MESSAGES);

    // Published as fast as it goes, values may merge, but they arrive in
    // order and the newest is never lost.
    let burst = 500;
    let healthy = healthy_reader(healthy, MESSAGES + burst);
    publish_many(&mut publisher, "feed.conflate", burst).await;
    let (seqs, _healthy) = healthy.await.unwrap();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(seqs.last(), Some(&(MESSAGES + burst)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_alarms_are_never_dropped_and_alone_can_overflow() {
    let server = start().await;
    let mut stuck = server
        .client_with("user=stuck&subscribe=feed.drop&subscribe=alarm.%23")
        .await;
    let mut publisher = server.client().await;

    // Alarms among a flood of droppable data.
    let alarms = 30;
    for _ in 0..alarms {
        publish_many(&mut publisher, "feed.drop", MESSAGES / alarms).await;
        publisher.publish("alarm.fire", "fire!").await.unwrap();
    }
    let queue = stuck_queue(&server);
    assert!(queue.dropped() > 0);
    let deliveries = drain(&mut stuck, "alarm.fire", alarms).await;
    let alarm_seqs: Vec<u64> = deliveries
        .iter()
        .filter(|d| d.topic == "alarm.fire")
        .map(|d| d.seq)
        .collect();
    assert_eq!(
        alarm_seqs,
        (1..=alarms).collect::<Vec<_>>(),
        "every alarm, in order"
    );

    // Critical messages alone overflowing the queue end the session (1008).
    publish_many(&mut publisher, "alarm.fire", MESSAGES).await;
    server.wait_for_sessions(1).await;
}
