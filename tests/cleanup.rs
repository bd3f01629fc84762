//! Sessions leave nothing behind: after thousands of connects and
//! disconnects, every index of the hub is empty again.

mod common;

use std::sync::Arc;

use common::{config, TestServer};
use wsproto_client::Client;

const CYCLES: usize = 10_000;
const CONCURRENCY: usize = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connect_disconnect_cycles_leave_no_subscription_room_or_user_behind() {
    let server = TestServer::start(config()).await;
    let url = Arc::new(server.url());
    let mut workers = Vec::new();
    for worker in 0..CONCURRENCY {
        let url = url.clone();
        workers.push(tokio::spawn(async move {
            for i in (worker..CYCLES).step_by(CONCURRENCY) {
                let query = format!("user=u{}&subscribe=t.{}&subscribe=all.%23", i % 10, i % 50);
                let mut client = Client::connect(&format!("{url}?{query}")).await.unwrap();
                client.welcome().await.unwrap();
                client
                    .join(&format!("room{}", i % 20), i % 2 == 0)
                    .await
                    .unwrap();
                // Half leave politely, half just vanish.
                if i % 2 == 0 {
                    client.close(1000).await.unwrap();
                } else {
                    drop(client);
                }
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    server.wait_for_sessions(0).await;
    let (users, rooms, topics_empty) = server.hub.index_sizes();
    assert_eq!((users, rooms, topics_empty), (0, 0, true));
    // And the server still works.
    let mut client = server.client_with("subscribe=t.1").await;
    client.join("room1", true).await.unwrap();
}
