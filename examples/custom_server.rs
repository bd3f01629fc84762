//! Building your own server from the library: register handlers for your
//! opcodes next to (or instead of) the built-in ones.
//!
//! ```text
//! cargo run --example custom_server
//! cargo run -p wsproto-client -- --url ws://127.0.0.1:8090/ws send 200 'hello'
//! ```

use std::time::Duration;

use wsproto::{
    handlers, Config, Frame, HandlerError, HandlerResult, Reply, Router, Server, Session,
};

/// Opcode 200: replies with the text upper-cased. It never waits, so it is
/// a plain function (routed with `route_sync`).
fn shout(_session: &Session, frame: Frame) -> HandlerResult {
    Ok(Reply::text(frame.text()?.to_uppercase()))
}

/// Opcode 201: counts down from the number in the payload, pushing one
/// frame per second to the session, then replies "liftoff".
async fn countdown(session: Session, frame: Frame) -> HandlerResult {
    let from: u32 = frame
        .text()?
        .trim()
        .parse()
        .map_err(|_| HandlerError::bad_payload("payload must be a number"))?;
    if from > 10 {
        // Application error codes start at 1000.
        return Err(HandlerError::new(
            1000,
            "counting down from more than 10 is tedious",
        ));
    }
    for n in (1..=from).rev() {
        session
            .send(Frame::new(201, n.to_string()))
            .map_err(|e| HandlerError::internal(e.to_string()))?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(Reply::text("liftoff"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let router: Router = handlers::builtin()
        .route_sync(200, shout)
        .route(201, countdown);
    let config = Config {
        listen: ":8090".parse()?,
        ..Config::default()
    };
    let server = Server::bind(config, router).await?;
    tracing::info!(addr = %server.local_addr()?, "custom server listening");
    server.run(wsproto::shutdown_signal()).await?;
    Ok(())
}
