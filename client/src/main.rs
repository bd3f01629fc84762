//! `wsproto-client`: send opcode frames to a wsproto server and print what
//! comes back.

mod bench;
mod token;

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::bail;
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use wsproto::{
    frame::{Preview, MAX_OPCODE},
    opcode,
    proto::v1,
    Frame,
};
use wsproto_client::{
    client::protocol_url, error_of, http, schema, tls_config, Client, ClientError, Event,
    Subscriber,
};

/// Request id of the PING sent after the user's frames: the server answers
/// frames in order, so its PONG means every reply has arrived.
const BARRIER_ID: u32 = u32::MAX;

/// Request id of the PING sent first on every connection: a wsproto
/// session answers WELCOME before it, while an endpoint that is not one
/// (such as `/echo`) answers at once with something else, so a wrong URL
/// shows in one round trip instead of a timeout.
const PROBE_ID: u32 = u32::MAX - 1;

/// Exit code of a usage error: a bad argument, as opposed to a failure of
/// the server or the connection (1).
const USAGE: u8 = 2;

/// A bad argument the parser could not catch alone (it depends on another
/// argument, or on a file); exits with [`USAGE`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

#[derive(Parser)]
#[command(name = "wsproto-client", version, about = "Client for wsproto servers")]
struct Cli {
    /// Server endpoint: the opcode protocol is at the path /ws.
    #[arg(
        long,
        global = true,
        env = "WSPROTO_URL",
        default_value = "ws://127.0.0.1:8080/ws",
        help_heading = "Connection"
    )]
    url: String,

    /// Give up when the server does not answer (connect, a reply, the
    /// publish API) within this long.
    #[arg(long, global = true, default_value = "10s", value_parser = parse_period, help_heading = "Connection")]
    timeout: Duration,

    /// PEM file of a CA to trust for wss:// (e.g. a private CA), besides
    /// the public web roots.
    #[arg(
        long,
        global = true,
        env = "WSPROTO_CA_FILE",
        help_heading = "Connection"
    )]
    ca_file: Option<PathBuf>,

    /// JWT to authenticate with (sent as `Authorization: Bearer`); for
    /// development, `wsproto-client token` makes one.
    #[arg(
        long,
        global = true,
        env = "WSPROTO_TOKEN",
        hide_env_values = true,
        help_heading = "Auth"
    )]
    token: Option<String>,

    /// Connect as this user (`?user=` in the URL), as servers in insecure
    /// mode allow; with --token the token says who the user is.
    #[arg(long, global = true, help_heading = "Auth")]
    user: Option<String>,

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
    /// Make a signed JWT (HS256) for a server started with --jwt-secret,
    /// for development and tests; prints it.
    Token(token::TokenArgs),
}

#[derive(Args)]
struct PublishArgs {
    /// Topic or pattern (e.g. `alarm.fire`, `rowdata.temp.#`).
    topic: String,

    /// Message data, as UTF-8 text.
    data: String,

    /// API key of the publish API.
    #[arg(
        long,
        env = "WSPROTO_API_KEY",
        hide_env_values = true,
        help_heading = "Auth"
    )]
    api_key: Option<String>,

    /// Publish with opcode 12 over the WebSocket instead of the HTTP API.
    #[arg(long, conflicts_with = "api_key")]
    ws: bool,
}

#[derive(Args)]
struct ListenArgs {
    /// Topic or pattern to subscribe to; repeatable.
    #[arg(long = "subscribe", short = 's', help_heading = "Subscriptions")]
    topics: Vec<String>,

    /// Room to join (with presence events); repeatable.
    #[arg(long = "join", help_heading = "Subscriptions")]
    rooms: Vec<String>,

    /// Exit after this many deliveries.
    #[arg(long)]
    count: Option<u64>,

    /// Listen as this device (`?device=ID`): what is printed counts as
    /// processed and is acknowledged, so the next run (or reconnect)
    /// resumes from there, the user's critical pushes included.
    #[arg(long)]
    device: Option<String>,
}

#[derive(Args)]
struct SendArgs {
    /// Opcode number (e.g. 110) or built-in name (e.g. add_friend).
    #[arg(value_parser = parse_opcode)]
    opcode: u32,

    /// Payload as UTF-8 text.
    #[arg(conflicts_with_all = ["hex", "file", "json"])]
    text: Option<String>,

    /// Payload as hex digits (spaces and a leading 0x allowed).
    #[arg(long, value_parser = parse_hex, help_heading = "Payload")]
    hex: Option<Bytes>,

    /// Payload read from a file.
    #[arg(long, help_heading = "Payload")]
    file: Option<PathBuf>,

    /// Payload as JSON, encoded as the opcode's protobuf request message.
    #[arg(long, conflicts_with_all = ["hex", "file"], help_heading = "Payload")]
    json: Option<String>,

    /// Send on this interval (e.g. 1s, 250ms) until Ctrl-C or --count.
    #[arg(long, value_parser = parse_period, help_heading = "Repeat")]
    every: Option<Duration>,

    /// With --every: stop after this many frames.
    #[arg(long, requires = "every", help_heading = "Repeat")]
    count: Option<u64>,

    /// Attach a request id (the replies echo it).
    #[arg(long, help_heading = "Output")]
    request_id: bool,

    /// Also print the WELCOME frame and the PONG that ends the exchange.
    #[arg(short, long, help_heading = "Output")]
    verbose: bool,
}

/// A duration such as `1s` or `250ms`, more than zero (a zero period
/// would send without pause, and a zero timeout could never be met).
fn parse_period(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(period) if period.is_zero() => Err("must be more than zero, e.g. 1s".into()),
        Ok(period) => Ok(period),
        Err(err) => Err(format!("{err} (expected e.g. 1s, 250ms)")),
    }
}

fn parse_hex(s: &str) -> Result<Bytes, String> {
    schema::payload_from_hex(s).map_err(|err| err.to_string())
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
    /// The payload the arguments give.
    ///
    /// # Errors
    /// [`Usage`] when the file cannot be read or the JSON does not fit.
    fn payload(&self) -> Result<Bytes, Usage> {
        Ok(match (&self.text, &self.hex, &self.file, &self.json) {
            (Some(text), ..) => Bytes::from(text.clone()),
            (_, Some(hex), ..) => hex.clone(),
            (_, _, Some(path), _) => std::fs::read(path)
                .map_err(|err| Usage(format!("--file: cannot read {}: {err}", path.display())))?
                .into(),
            (.., Some(json)) => schema::payload_from_json(self.opcode, json)
                .map_err(|err| Usage(format!("--json: {err}")))?,
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
    user: Option<String>,
}

impl Target {
    /// `url` with `?user=` added when --user is given.
    fn url_for(&self, url: &str) -> String {
        match &self.user {
            Some(user) => {
                let separator = if url.contains('?') { '&' } else { '?' };
                let user: String = form_urlencoded::byte_serialize(user.as_bytes()).collect();
                format!("{url}{separator}user={user}")
            }
            None => url.to_owned(),
        }
    }

    async fn connect(&self, url: &str) -> anyhow::Result<Client> {
        let connect = Client::connect_with_token(url, self.tls.clone(), self.token.as_deref());
        bounded(self.timeout, connect).await
    }

    /// Connects and checks that `url` is a wsproto session: its first
    /// frame must be WELCOME (returned). A PING goes out at once, so an
    /// endpoint that is something else (an echo server answers with the
    /// PING itself) is recognised in one round trip, not after a timeout.
    async fn session(&self, url: &str) -> anyhow::Result<(Client, Frame)> {
        let mut client = self.connect(&self.url_for(url)).await?;
        let probe = Frame::new(opcode::PING, Bytes::new()).with_request_id(Some(PROBE_ID));
        client.send(&probe).await?;
        let first = bounded(self.timeout, client.recv()).await?;
        if first.opcode == opcode::WELCOME {
            return Ok((client, first));
        }
        let suggestion = protocol_url(url);
        if first.encode() == probe.encode() {
            bail!(
                "{url} sent back what it was sent, and no WELCOME frame: it is an echo endpoint \
                 (such as /echo), not the opcode protocol, which is at {suggestion}"
            );
        }
        bail!(
            "{url} did not begin with a WELCOME frame (its first frame has opcode {}), so it is \
             not a wsproto session; the opcode protocol is at {suggestion}",
            first.opcode
        )
    }
}

/// Whether `frame` answers one of the PINGs the CLI sends itself.
fn is_own_pong(frame: &Frame, id: u32) -> bool {
    frame.opcode == opcode::PONG && frame.request_id == Some(id)
}

async fn send(target: &Target, args: SendArgs) -> anyhow::Result<bool> {
    let timeout = target.timeout;
    let payload = args.payload()?;
    let (mut client, welcome) = target.session(&target.url).await?;
    print_frame(&welcome, args.verbose);
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
                if is_own_pong(&frame, PROBE_ID) {
                    continue;
                }
                failed |= print_frame(&frame, args.verbose);
                if is_own_pong(&frame, BARRIER_ID) {
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
        .ok_or_else(|| Usage("--url must be ws://HOST:PORT/PATH to find the publish API".into()))?;
    let host = rest.split(['/', '?']).next().unwrap_or_default();
    Ok(format!("http://{host}/api/publish"))
}

async fn publish(target: &Target, args: PublishArgs) -> anyhow::Result<bool> {
    let (url, timeout) = (target.url.as_str(), target.timeout);
    if args.ws {
        let (mut client, _welcome) = target.session(url).await?;
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
    let url = target.url.as_str();
    if args.topics.is_empty() && args.rooms.is_empty() && target.user.is_none() {
        return Err(Usage(
            "nothing to listen to: give --subscribe TOPIC, --join ROOM or --user ID".into(),
        )
        .into());
    }
    // The first connection is checked the way every command's is, so a
    // wrong URL fails at once with a reason instead of being retried.
    let (probe, _welcome) = target.session(url).await?;
    probe.close(1000).await?;
    let mut subscriber =
        Subscriber::new(target.url_for(url), args.topics.clone(), args.rooms.clone())
            .with_auth(target.tls.clone(), target.token.clone());
    if let Some(device) = &args.device {
        subscriber = subscriber.with_device(device);
    }
    let mut received = 0u64;
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    while args.count.is_none_or(|count| received < count) {
        let event = tokio::select! {
            _ = &mut interrupt => break,
            event = subscriber.next() => event?,
        };
        // Everything but deliveries goes to stderr, so stdout holds
        // deliveries only.
        match event {
            Event::Subscribed {
                streams,
                reconnected,
            } => report_streams(&args, target, &streams, reconnected),
            Event::Delivery(delivery) => {
                println!("{}", describe_delivery(&delivery));
                received += 1;
            }
            Event::Gap(gap) => eprintln!(
                "GAP: {} missed seq {}..{} of epoch {} ({}); reload what it describes",
                match (gap.user, gap.room.is_empty()) {
                    (true, _) => "the user's critical pushes".to_owned(),
                    (false, true) => format!("topic={}", gap.topic),
                    (false, false) => format!("room={}", gap.room),
                },
                gap.from_seq,
                match gap.to_seq {
                    0 => "?".to_owned(),
                    to => to.to_string(),
                },
                gap.epoch,
                gap.reason
            ),
            Event::Disconnected { error, retry_in } => eprintln!(
                "disconnected ({error}); reconnecting in {}",
                humantime::format_duration(Duration::from_millis(retry_in.as_millis() as u64))
            ),
            Event::Frame(frame) if frame.opcode == opcode::WELCOME => {}
            Event::Frame(frame) => {
                print_frame(&frame, false);
            }
        }
    }
    subscriber.close().await;
    Ok(true)
}

/// Says on stderr what a (re)subscription found.
fn report_streams(args: &ListenArgs, target: &Target, streams: &[v1::StreamState], again: bool) {
    match again {
        false => {
            if !args.topics.is_empty() {
                eprintln!("subscribed to {}", args.topics.join(", "));
            }
            for room in &args.rooms {
                eprintln!("joined {room}");
            }
            if let Some(user) = &target.user {
                eprintln!("listening as user {user} (direct messages to {user} arrive here too)");
            }
        }
        true => {
            let lost: Vec<&str> = streams
                .iter()
                .filter(|s| !s.recovered)
                .map(|s| {
                    if s.room.is_empty() {
                        &*s.topic
                    } else {
                        &*s.room
                    }
                })
                .collect();
            let replayed: u32 = streams.iter().map(|s| s.replayed).sum();
            match lost.is_empty() {
                true => eprintln!("reconnected: recovered {replayed} missed message(s)"),
                false => eprintln!(
                    "reconnected: recovered {replayed} message(s); NOT recovered: {}",
                    lost.join(", ")
                ),
            }
        }
    }
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

/// A JWT's outline: three base64url parts separated by dots, the first a
/// JSON header. Checked before connecting, so a mistyped or truncated
/// token is reported here, in words.
fn check_token(token: &str) -> Result<(), Usage> {
    let not_a_jwt = |why: String| Usage(format!("--token is not a JWT: {why}"));
    if let Some(bad) = token
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(not_a_jwt(format!(
            "{bad:?} cannot appear in one (it is letters, digits, '-', '_' and '.')"
        )));
    }
    let parts = token.split('.').count();
    if parts != 3 || token.split('.').any(str::is_empty) {
        let found = match parts {
            3 => "one of them is empty".to_owned(),
            n => format!("this one has {n}"),
        };
        return Err(not_a_jwt(format!(
            "a JWT has three non-empty parts separated by '.'; {found}"
        )));
    }
    if jsonwebtoken::decode_header(token).is_err() {
        return Err(not_a_jwt(
            "its first part is not a base64url-encoded JSON header".into(),
        ));
    }
    Ok(())
}

/// `err` and its causes as one line, leaving out a cause whose text is
/// already there (many errors repeat their source in their own message).
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// 2 for a usage error, 1 for everything else.
fn exit_code(err: &anyhow::Error) -> ExitCode {
    let usage = err.downcast_ref::<Usage>().is_some()
        || matches!(
            err.downcast_ref::<ClientError>(),
            Some(ClientError::Url { .. } | ClientError::InvalidToken | ClientError::Tls(_))
        );
    match usage {
        true => ExitCode::from(USAGE),
        false => ExitCode::FAILURE,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A load generator must be fair to its own connections, or the tail
    // latency it reports is its own: with tokio's default, connections
    // woken in one batch past a thread's local queue wait in the shared
    // queue while the others are served again. Measured against
    // fastwebsockets at 1,000 connections: a p99 of ~165 ms with tokio's
    // default, 40-60 ms with this.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .global_queue_interval(2)
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(main_async(cli))
}

async fn main_async(cli: Cli) -> ExitCode {
    match run(cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            exit_code(&err)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    if let Command::Token(args) = cli.command {
        println!("{}", token::mint(&args)?);
        return Ok(true);
    }
    if let Some(token) = &cli.token {
        check_token(token)?;
    }
    let tls = match cli.url.starts_with("wss://") {
        false => None,
        true => Some(tls_config(cli.ca_file.as_deref())?),
    };
    let target = Target {
        url: cli.url,
        timeout: cli.timeout,
        tls,
        token: cli.token,
        user: cli.user,
    };
    match cli.command {
        Command::Send(args) => send(&target, args).await,
        Command::Publish(args) => publish(&target, args).await,
        Command::Listen(args) => listen(&target, args).await,
        Command::Bench(args) => bench::run(&target.url, target.token.as_deref(), args).await,
        Command::Token(_) => Ok(true),
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
