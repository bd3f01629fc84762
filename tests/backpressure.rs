//! Backpressure on a client's own requests: a client that pipelines
//! requests faster than it reads the replies is slowed down by TCP (the
//! server stops reading it while its replies are queued), not closed; a
//! client that does not read pushes is still closed as a slow consumer.

mod common;

use std::time::Duration;

use common::{config, TestServer};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::{connect_async, tungstenite::Message};
use wsproto::{opcode, Config, Frame};

const REQUESTS: u32 = 10_000;
/// Large enough that the replies (10 MB) overflow every socket buffer
/// between the server and a client that is not reading yet.
const PADDING: usize = 1000;

/// The ECHO request with id `id`; its payload names the id, so a reply
/// shows which request it answers.
fn echo(id: u32) -> Message {
    let payload = format!("request {id:05} {}", "x".repeat(PADDING));
    Message::Binary(
        Frame::new(opcode::ECHO, payload)
            .with_request_id(Some(id))
            .encode(),
    )
}

/// Connects to `url` and sends ECHO requests, never reading a reply, until
/// all are sent or the connection fails; the task holds the connection.
async fn pipeline_without_reading(url: String) -> tokio::task::JoinHandle<()> {
    let (ws, _) = connect_async(url).await.unwrap();
    let (mut sink, _) = ws.split();
    tokio::spawn(async move {
        for id in 1..=REQUESTS {
            if sink.feed(echo(id)).await.is_err() {
                break;
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_pipelines_faster_than_it_reads_is_slowed_not_closed() {
    let server = TestServer::start(Config {
        send_queue: 64,
        ..config()
    })
    .await;
    let (ws, _) = connect_async(server.url()).await.unwrap();
    let (mut sink, mut stream) = ws.split();

    // Every request goes out before the first reply is read; `feed` only
    // waits when the socket is full, so TCP alone paces this task.
    let sender = tokio::spawn(async move {
        for id in 1..=REQUESTS {
            sink.feed(echo(id)).await.unwrap();
        }
        sink.flush().await.unwrap();
        sink
    });
    let reader = tokio::spawn(async move {
        // A client busy elsewhere for a moment: the replies back up.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut replies = Vec::new();
        while replies.len() < REQUESTS as usize + 1 {
            match stream.next().await {
                Some(Ok(Message::Binary(data))) => replies.push(Frame::decode(data).unwrap()),
                Some(Ok(Message::Close(close))) => panic!(
                    "closed after {} replies: {close:?}",
                    replies.len().saturating_sub(1)
                ),
                Some(Ok(_)) => {}
                other => panic!("connection ended: {other:?}"),
            }
        }
        (replies, stream)
    });
    let (sent, read) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(sender, reader)
    })
    .await
    .expect("every reply within 60 s");
    let mut sink = sent.unwrap();
    let (replies, mut stream) = read.unwrap();

    assert_eq!(replies[0].opcode, opcode::WELCOME);
    for (id, reply) in (1..=REQUESTS).zip(&replies[1..]) {
        assert_eq!(
            (reply.opcode, reply.request_id),
            (opcode::ECHO, Some(id)),
            "replies in request order"
        );
        assert_eq!(
            reply.text().unwrap(),
            format!("request {id:05} {}", "x".repeat(PADDING))
        );
    }
    // Still open, and still answering.
    assert_eq!(server.hub.len(), 1);
    sink.send(echo(REQUESTS + 1)).await.unwrap();
    let last = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an answer within 10 s");
    let Some(Ok(Message::Binary(last))) = last else {
        panic!("{last:?}");
    };
    assert_eq!(Frame::decode(last).unwrap().request_id, Some(REQUESTS + 1));
    assert_eq!(server.node.counter_snapshot().closed_slow_consumer, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_held_back_that_does_not_read_pushes_is_still_a_slow_consumer() {
    let server = TestServer::start(Config {
        send_queue: 64,
        // Long, so only the queue bound can close the stuck client.
        write_timeout: Duration::from_secs(60),
        shutdown_timeout: Duration::from_millis(500),
        client_publish: vec!["#".parse().unwrap()],
        ..config()
    })
    .await;
    let url = format!("{}?user=stuck&subscribe=feed", server.url());
    // It pipelines requests and never reads anything, so the server stops
    // reading it once its replies are queued.
    let pipeline = pipeline_without_reading(url).await;
    server.wait_for_sessions(1).await;

    let mut publisher = server.client().await;
    let data = vec![7u8; 8 * 1024];
    let mut published = 0;
    while !server.hub.sessions_of_user("stuck").is_empty() {
        assert!(published < 3000, "still open after {published} pushes");
        publisher.publish("feed", data.clone()).await.unwrap();
        published += 1;
    }
    assert_eq!(server.node.counter_snapshot().closed_slow_consumer, 1);
    // The publisher is unaffected.
    assert_eq!(
        publisher.call(opcode::ECHO, "alive").await.unwrap().payload,
        "alive"
    );
    pipeline.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_held_back_that_stops_reading_is_closed_by_the_write_timeout() {
    let server = TestServer::start(Config {
        send_queue: 64,
        write_timeout: Duration::from_secs(1),
        shutdown_timeout: Duration::from_millis(500),
        ..config()
    })
    .await;
    let pipeline = pipeline_without_reading(server.url()).await;
    server.wait_for_sessions(1).await;
    // Its replies fill the socket, the writer's write times out and the
    // session ends: being held back is not a way to stay open forever.
    server.wait_for_sessions(0).await;
    assert_eq!(server.node.counter_snapshot().closed_slow_consumer, 1);
    pipeline.abort();
}
