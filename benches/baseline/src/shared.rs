//! What both reference servers share: the accept loop and the way they stop.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// Listens on `listen` (printing the address, since port 0 picks one) and runs
/// `serve` on a task of its own for every connection, until Ctrl-C or SIGTERM.
///
/// Accept errors (usually running out of file descriptors) are reported and retried
/// after a short pause, so a full fd table does not turn into a busy loop.
///
/// # Errors
/// When `listen` cannot be bound or the signal handlers cannot be installed.
pub async fn run<F, Fut>(name: &str, listen: SocketAddr, serve: F) -> anyhow::Result<()>
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(listen).await?;
    eprintln!("{name} listening addr={}", listener.local_addr()?);
    let accept_loop = async {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve(stream));
                }
                Err(err) => {
                    eprintln!("{name} accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    };
    tokio::select! {
        () = accept_loop => Ok(()),
        result = shutdown_signal() => Ok(result?),
    }
}

/// Completes on Ctrl-C or SIGTERM, so a benchmark script can stop a server cleanly
/// and read what it prints on the way out.
#[cfg(unix)]
async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result,
        _ = terminate.recv() => Ok(()),
    }
}

/// Completes on Ctrl-C.
#[cfg(not(unix))]
async fn shutdown_signal() -> std::io::Result<()> {
    tokio::signal::ctrl_c().await
}
