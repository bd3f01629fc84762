//! `wsproto-client`: send opcode frames to a wsproto server and print what
//! comes back.

mod bench;

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use prost::Message as _;
use wsproto::{
    frame::{Preview, MAX_OPCODE},
    opcode,
    proto::v1,
    Frame,
};
use wsproto_client::{error_of, http, schema, tls_config, Client, ClientError};

/// Request id of the PING sent after the user's frames: the server answers
/// frames in order, so its PONG means every reply has arrived.
const BARRIER_ID: u32 = u32::MAX;

#[derive(Parser)]
#[command(name = "wsproto-client", version, about = "Client for wsproto servers")]
struct Cli {
    /// Server endpoint.
    #[arg(
        long,
        global = true,
        env = "WSPROTO_URL",
        default_value = "ws://127.0.0.1:8080/ws"
    )]
    url: String,

    /// Give up when the server does not answer (connect, a reply, the
    /// publish API) within this long.
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,

    /// PEM file of a CA to trust for wss:// (e.g. a private CA), besides
    /// the public web roots.
    #[arg(long, global = true, env = "WSPROTO_CA_FILE")]
    ca_file: Option<PathBuf>,

    /// JWT to authenticate with (sent as `Authorization: Bearer`).
    #[arg(long, global = true, env = "WSPROTO_TOKEN", hide_env_values = true)]
    token: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send one frame (or one per tick with --every) and print the replies.
    Send(SendArgs),
    /// Publish to a topic through the server's HTTP publish API (or, with
    /// --ws, over the WebSocket where the server permits it).
    Publish(PublishArgs),
    /// Subscribe to topics (and join rooms) and print deliveries as they arrive.
    Listen(ListenArgs),
    /// Load-test a server: echo round trips, topic fan-out, idle connections.
    Bench(bench::BenchArgs),
}

#[derive(Args)]
struct PublishArgs {
    /// Topic or pattern (e.g. `alarm.fire`, `rowdata.temp.#`).
    topic: String,

    /// Message data, as UTF-8 text.
    data: String,

    /// API key of the publish API.
    #[arg(long, env = "WSPROTO_API_KEY", hide_env_values = true)]
    api_key: Option<String>,

    /// Publish with opcode 12 over the WebSocket instead of the HTTP API.
    #[arg(long, conflicts_with = "api_key")]
    ws: bool,
}

#[derive(Args)]
struct ListenArgs {
    /// Topic or pattern to subscribe to; repeatable.
    #[arg(long = "subscribe", short = 's')]
    topics: Vec<String>,

    /// Room to join (with presence events); repeatable.
    #[arg(long = "join")]
    rooms: Vec<String>,

    /// Connect as this user (honoured by servers in insecure mode).
    #[arg(long)]
    user: Option<String>,

    /// Exit after this many deliveries.
    #[arg(long)]
    count: Option<u64>,
}

#[derive(Args)]
struct SendArgs {
    /// Opcode number (e.g. 110) or built-in name (e.g. add_friend).
    #[arg(value_parser = parse_opcode)]
    opcode: u32,

    /// Payload as UTF-8 text.
    #[arg(conflicts_with_all = ["hex", "file", "json"])]
    text: Option<String>,

    /// Payload as hex digits.
    #[arg(long)]
    hex: Option<String>,

    /// Payload read from a file.
    #[arg(long)]
    file: Option<PathBuf>,

    /// Payload as JSON, encoded as the opcode's protobuf request message.
    #[arg(long, conflicts_with_all = ["hex", "file"])]
    json: Option<String>,

    /// Send on this interval (e.g. 1s, 250ms) until Ctrl-C or --count.
    #[arg(long, value_parser = humantime::parse_duration)]
    every: Option<Duration>,

    /// With --every: stop after this many frames.
    #[arg(long, requires = "every")]
    count: Option<u64>,

    /// Attach a request id (the replies echo it).
    #[arg(long)]
    request_id: bool,

    /// Also print the WELCOME frame and the PONG that ends the exchange.
    #[arg(short, long)]
    verbose: bool,
}

fn parse_opcode(s: &str) -> Result<u32, String> {
    if let Ok(code) = s.parse::<u32>() {
        return match code <= MAX_OPCODE {
            true => Ok(code),
            false => Err(format!(
                "opcode {code} exceeds the 24-bit maximum {MAX_OPCODE}"
            )),
        };
    }
    opcode::BUILTIN
        .iter()
        .find(|spec| spec.name.eq_ignore_ascii_case(s))
        .map(|spec| spec.code)
        .ok_or_else(|| format!("{s:?} is neither a number nor a built-in opcode name"))
}

impl SendArgs {
    fn payload(&self) -> anyhow::Result<Bytes> {
        Ok(match (&self.text, &self.hex, &self.file, &self.json) {
            (Some(text), ..) => Bytes::from(text.clone()),
            (_, Some(hex), ..) => schema::payload_from_hex(hex)?,
            (_, _, Some(path), _) => std::fs::read(path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .into(),
            (.., Some(json)) => schema::payload_from_json(self.opcode, json)?,
            _ => Bytes::new(),
        })
    }
}

/// Prints one frame from the server; returns whether it was an error frame.
fn print_frame(frame: &Frame, verbose: bool) -> bool {
    if let Some(error) = error_of(frame) {
        let code =
            wsproto::ErrorCode::from_u32(error.code).map_or("application error", |c| c.name());
        eprintln!(
            "error: server replied {code} ({}) to opcode {}: {}",
            error.code, error.opcode, error.message
        );
        return true;
    }
    let is_barrier = frame.opcode == opcode::PONG && frame.request_id == Some(BARRIER_ID);
    if verbose || (frame.opcode != opcode::WELCOME && !is_barrier) {
        println!("{}", schema::describe(frame));
    }
    false
}

/// Where and how to connect, shared by every subcommand.
struct Target {
    url: String,
    timeout: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
    token: Option<String>,
}

impl Target {
    async fn connect(&self, url: &str) -> anyhow::Result<Client> {
        let connect = Client::connect_with_token(url, self.tls.clone(), self.token.as_deref());
        bounded(self.timeout, connect).await
    }
}

async fn send(target: &Target, args: SendArgs) -> anyhow::Result<bool> {
    let timeout = target.timeout;
    let payload = args.payload()?;
    let mut client = target.connect(&target.url).await?;
    let mut request_id = 0u32;
    let mut frame = move || {
        request_id += 1;
        Frame::new(args.opcode, payload.clone())
            .with_request_id(args.request_id.then_some(request_id))
    };
    let barrier = Frame::new(opcode::PING, Bytes::new()).with_request_id(Some(BARRIER_ID));

    let mut ticks = args.every.map(tokio::time::interval);
    let mut sent = 0u64;
    let mut done_sending = false;
    if ticks.is_none() {
        client.send(&frame()).await?;
        client.send(&barrier).await?;
        done_sending = true;
    }
    let mut failed = false;
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    loop {
        tokio::select! {
            _ = &mut interrupt => break,
            _ = tick(&mut ticks), if !done_sending => {
                client.send(&frame()).await?;
                sent += 1;
                if args.count.is_some_and(|count| sent >= count) {
                    client.send(&barrier).await?;
                    done_sending = true;
                }
            }
            // While sending on a timer, silence is normal; after the last
            // frame, the replies must come within the timeout.
            received = recv(&mut client, done_sending.then_some(timeout)) => {
                let frame = received?;
                failed |= print_frame(&frame, args.verbose);
                if frame.opcode == opcode::PONG && frame.request_id == Some(BARRIER_ID) {
                    break;
                }
            }
        }
    }
    client.close(1000).await?;
    Ok(!failed)
}

/// The publish API's URL on the server of a `ws://HOST/PATH` URL.
fn api_url(ws_url: &str) -> anyhow::Result<String> {
    let rest = ws_url
        .strip_prefix("ws://")
        .context("--url must be ws://HOST:PORT/PATH to find the publish API")?;
    let host = rest.split(['/', '?']).next().unwrap_or_default();
    Ok(format!("http://{host}/api/publish"))
}

async fn publish(target: &Target, args: PublishArgs) -> anyhow::Result<bool> {
    let (url, timeout) = (target.url.as_str(), target.timeout);
    if args.ws {
        let mut client = target.connect(url).await?;
        let published = bounded(timeout, client.publish(&args.topic, args.data)).await?;
        println!(
            "published to {}: seq={} sessions={}",
            published.topic, published.seq, published.sessions
        );
        client.close(1000).await?;
        return Ok(true);
    }
    let body = serde_json::json!({ "topic": args.topic, "data": args.data }).to_string();
    let (status, response) = bounded(
        timeout,
        http::post_json(&api_url(url)?, args.api_key.as_deref(), &body),
    )
    .await?;
    let json: serde_json::Value = serde_json::from_slice(&response).unwrap_or_default();
    if !status.is_success() {
        let reason = json["error"].as_str().unwrap_or("no reason given");
        anyhow::bail!("publish API answered HTTP {}: {reason}", status.as_u16());
    }
    println!(
        "published to {}: seq={} sessions={}",
        args.topic, json["seq"], json["sessions"]
    );
    Ok(true)
}

/// One delivery as a line: where it came from, its number, sender and data.
fn describe_delivery(delivery: &v1::Delivery) -> String {
    let source = match delivery.kind() {
        v1::delivery::Kind::Topic => format!("topic={}", delivery.topic),
        v1::delivery::Kind::Room => format!("room={}", delivery.room),
        v1::delivery::Kind::Direct => "direct".to_owned(),
        v1::delivery::Kind::Broadcast => "broadcast".to_owned(),
    };
    let sender = match &delivery.sender {
        Some(sender) if !sender.user_id.is_empty() => sender.user_id.clone(),
        Some(sender) => sender.session_id.clone(),
        None => "-".to_owned(),
    };
    format!(
        "{source} seq={} from={sender} {}",
        delivery.seq,
        Preview::new(&delivery.data, usize::MAX)
    )
}

async fn listen(target: &Target, args: ListenArgs) -> anyhow::Result<bool> {
    let (url, timeout) = (target.url.as_str(), target.timeout);
    if args.topics.is_empty() && args.rooms.is_empty() && args.user.is_none() {
        anyhow::bail!("nothing to listen to: give --subscribe TOPIC, --join ROOM or --user ID");
    }
    let url = match &args.user {
        Some(user) => {
            let separator = if url.contains('?') { '&' } else { '?' };
            let user: String = form_urlencoded::byte_serialize(user.as_bytes()).collect();
            format!("{url}{separator}user={user}")
        }
        None => url.to_owned(),
    };
    let mut client = target.connect(&url).await?;
    if !args.topics.is_empty() {
        let topics: Vec<&str> = args.topics.iter().map(String::as_str).collect();
        bounded(timeout, client.subscribe(&topics)).await?;
    }
    for room in &args.rooms {
        let presence = bounded(timeout, client.join(room, true)).await?;
        eprintln!("joined {room}: {} member(s)", presence.count);
    }
    let mut received = 0u64;
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    while args.count.is_none_or(|count| received < count) {
        let frame = tokio::select! {
            _ = &mut interrupt => break,
            frame = client.recv() => frame?,
        };
        match frame.opcode {
            opcode::DELIVERY => {
                let delivery =
                    v1::Delivery::decode(frame.payload).context("undecodable DELIVERY")?;
                println!("{}", describe_delivery(&delivery));
                received += 1;
            }
            opcode::WELCOME => {}
            _ => {
                print_frame(&frame, false);
            }
        }
    }
    client.close(1000).await?;
    Ok(true)
}

/// `future`, or an error once `timeout` has passed without an answer.
async fn bounded<T, E>(
    timeout: Duration,
    future: impl std::future::Future<Output = Result<T, E>>,
) -> anyhow::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(timeout, future).await {
        Ok(result) => Ok(result?),
        Err(_) => anyhow::bail!(
            "no answer from the server within {}",
            humantime::format_duration(timeout)
        ),
    }
}

async fn recv(client: &mut Client, timeout: Option<Duration>) -> Result<Frame, ClientError> {
    match timeout {
        Some(timeout) => client.recv_timeout(timeout).await,
        None => client.recv().await,
    }
}

async fn tick(ticks: &mut Option<tokio::time::Interval>) {
    match ticks {
        Some(ticks) => {
            ticks.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let tls = match (cli.url.starts_with("wss://"), &cli.ca_file) {
        (false, _) => None,
        (true, ca_file) => match tls_config(ca_file.as_deref()) {
            Ok(config) => Some(config),
            Err(err) => {
                eprintln!("error: {err}");
                return ExitCode::FAILURE;
            }
        },
    };
    let target = Target {
        url: cli.url,
        timeout: cli.timeout,
        tls,
        token: cli.token,
    };
    let result = match cli.command {
        Command::Send(args) => send(&target, args).await,
        Command::Publish(args) => publish(&target, args).await,
        Command::Listen(args) => listen(&target, args).await,
        Command::Bench(args) => bench::run(&target.url, target.token.as_deref(), args).await,
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcodes_by_number_or_name() {
        assert_eq!(parse_opcode("110"), Ok(110));
        assert_eq!(parse_opcode("add_friend"), Ok(110));
        assert_eq!(parse_opcode("ECHO"), Ok(100));
        assert!(parse_opcode("16777216").is_err());
        assert!(parse_opcode("nope").is_err());
    }

    #[test]
    fn the_publish_api_lives_on_the_websocket_server() {
        assert_eq!(
            api_url("ws://127.0.0.1:8080/ws").unwrap(),
            "http://127.0.0.1:8080/api/publish"
        );
        assert_eq!(
            api_url("ws://[::1]:9/x?user=a").unwrap(),
            "http://[::1]:9/api/publish"
        );
        assert!(api_url("wss://example.com/ws").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
