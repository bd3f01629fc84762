//! Stream positions on the client side: what makes recovery after a
//! reconnect, and exactly-once delivery to the application, work.
//!
//! The server numbers every topic and room message with a position
//! `(epoch, seq)`. A client keeps the last one it saw per stream, sends
//! them when it subscribes or joins again, and drops any delivery whose
//! position it has already seen (a message can come twice when a
//! recovery's history and the live stream overlap, or when an
//! acknowledged delivery is sent again). [`Subscriber`] does all of it,
//! reconnecting with back-off.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use prost::Message as _;
use wsproto::{opcode, proto::v1, topic::Topic, Frame};

use crate::{backoff::Backoff, Client, ClientError};

/// The last position seen per stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Positions {
    /// By stream: `t:TOPIC`, `r:ROOM`, or `u` (the user's stream of
    /// critical pushes).
    streams: HashMap<String, Kept>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Kept {
    /// Where to recover from: the last delivery, or a later position a
    /// server reported (a stream seen through a gap).
    since: v1::Position,
    /// The last message actually delivered: only it makes later copies
    /// duplicates (a reported position may be ahead of messages still on
    /// their way).
    delivered: Option<v1::Position>,
}

/// What [`Positions::observe`] made of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// Not seen before: hand it to the application.
    New,
    /// Its position was seen already: drop it.
    Duplicate,
    /// Not numbered (direct messages, broadcasts): nothing to compare.
    Unnumbered,
}

impl Positions {
    /// No positions: everything is new.
    pub fn new() -> Positions {
        Positions::default()
    }

    fn key(delivery: &v1::Delivery) -> Option<String> {
        match v1::delivery::Kind::try_from(delivery.kind).ok()? {
            v1::delivery::Kind::Topic => Some(format!("t:{}", delivery.topic)),
            v1::delivery::Kind::Room => Some(format!("r:{}", delivery.room)),
            // Numbered direct messages are the user's critical pushes.
            v1::delivery::Kind::Direct => Some("u".to_owned()),
            _ => None,
        }
    }

    /// Records a delivery's position; says whether it is new.
    pub fn observe(&mut self, delivery: &v1::Delivery) -> Observed {
        // Without an epoch (a server without positions) a sequence number
        // may restart unannounced: nothing can be compared.
        let numbered = delivery.seq > 0 && !delivery.epoch.is_empty();
        let Some(key) = Positions::key(delivery).filter(|_| numbered) else {
            return Observed::Unnumbered;
        };
        let position = v1::Position {
            epoch: delivery.epoch.clone(),
            seq: delivery.seq,
        };
        let kept = self.streams.entry(key).or_insert_with(|| Kept {
            since: position.clone(),
            delivered: None,
        });
        let seen = kept
            .delivered
            .as_ref()
            .is_some_and(|d| d.epoch == position.epoch && position.seq <= d.seq);
        if seen {
            return Observed::Duplicate;
        }
        if kept.since.epoch != position.epoch || kept.since.seq < position.seq {
            kept.since = position.clone();
        }
        kept.delivered = Some(position);
        Observed::New
    }

    /// Takes the position a SUBSCRIBE or JOIN reply reports, so that the
    /// next recovery starts there: for a stream without one (recover even
    /// if no message arrives before the next reconnect), or one the server
    /// is past (a range announced as a gap, a new epoch), so the same gap
    /// is not announced again.
    pub fn record(&mut self, state: &v1::StreamState) {
        let key = match state.room.is_empty() {
            true => format!("t:{}", state.topic),
            false => format!("r:{}", state.room),
        };
        let Some(position) = &state.position else {
            return;
        };
        match self.streams.get_mut(&key) {
            None => {
                self.streams.insert(
                    key,
                    Kept {
                        since: position.clone(),
                        delivered: None,
                    },
                );
            }
            Some(kept) => {
                if kept.since.epoch != position.epoch || kept.since.seq < position.seq {
                    kept.since = position.clone();
                }
            }
        }
    }

    /// Forgets a stream (after unsubscribing or leaving): `t:TOPIC` or
    /// `r:ROOM`.
    pub fn forget(&mut self, stream: &str) {
        self.streams.remove(stream);
    }

    /// The kept positions of topic streams that `topics` (names or
    /// patterns) cover: a SUBSCRIBE's `since`.
    pub fn topics_covered_by(&self, topics: &[&str]) -> HashMap<String, v1::Position> {
        let patterns: Vec<Topic> = topics.iter().filter_map(|t| Topic::parse(t).ok()).collect();
        self.streams
            .iter()
            .filter_map(|(key, kept)| Some((key.strip_prefix("t:")?, kept)))
            .filter(|(name, _)| {
                Topic::parse(name).is_ok_and(|name| patterns.iter().any(|p| p.covers(&name)))
            })
            .map(|(name, kept)| (name.to_owned(), kept.since.clone()))
            .collect()
    }

    /// The kept position of a room's stream: a JOIN's `since`.
    pub fn room(&self, room: &str) -> Option<v1::Position> {
        self.streams
            .get(&format!("r:{room}"))
            .map(|k| k.since.clone())
    }

    /// The kept position of a topic's stream.
    pub fn topic(&self, topic: &str) -> Option<v1::Position> {
        self.streams
            .get(&format!("t:{topic}"))
            .map(|k| k.since.clone())
    }
}

/// What a [`Subscriber`] has for the application.
#[derive(Debug)]
pub enum Event {
    /// (Re)connected and (re)subscribed: where each stream stands, and
    /// whether what was missed was recovered. A stream with `recovered`
    /// false lost messages (a [`Event::Gap`] said which): reload its state.
    Subscribed {
        /// Streams reported by the server's replies.
        streams: Vec<v1::StreamState>,
        /// True after a reconnect, false the first time.
        reconnected: bool,
    },
    /// A message not seen before, live or recovered.
    Delivery(v1::Delivery),
    /// Messages of a stream are missing and cannot be delivered.
    Gap(v1::Gap),
    /// Any other frame the server sent (presence events, pushes...).
    Frame(Frame),
    /// The connection failed or was lost; the next attempt is in `retry_in`.
    Disconnected {
        /// What happened.
        error: String,
        /// The back-off delay before the next attempt.
        retry_in: Duration,
    },
}

/// A subscription that survives reconnects: it reconnects with exponential
/// back-off and full jitter, subscribes and joins again with the positions
/// it kept, and hands the application every message once, in order.
pub struct Subscriber {
    /// Where to connect; after a failed attempt the next one is tried.
    urls: Vec<String>,
    url_index: usize,
    tls: Option<Arc<rustls::ClientConfig>>,
    token: Option<String>,
    topics: Vec<String>,
    rooms: Vec<String>,
    positions: Positions,
    backoff: Backoff,
    client: Option<Client>,
    /// When the next connection attempt may start.
    retry_at: Option<tokio::time::Instant>,
    connected_before: bool,
    duplicates: u64,
    events: VecDeque<Event>,
    /// Acknowledging, as device `device` (see [`Subscriber::with_device`]).
    device: Option<String>,
    /// The delivery handed out last: processed once `next` is called again.
    handed: Option<v1::StreamAck>,
    /// Processed positions not yet acknowledged, by stream.
    unacknowledged: HashMap<String, v1::StreamAck>,
    last_acknowledged: Option<tokio::time::Instant>,
}

/// How often a [`Subscriber`] sends its device's acknowledgements.
const ACKNOWLEDGE_EVERY: Duration = Duration::from_millis(100);

impl Subscriber {
    /// A subscriber to `topics` and `rooms` at `url` (not connected yet:
    /// [`Subscriber::next`] connects).
    pub fn new(url: impl Into<String>, topics: Vec<String>, rooms: Vec<String>) -> Subscriber {
        Subscriber {
            urls: vec![url.into()],
            url_index: 0,
            tls: None,
            token: None,
            topics,
            rooms,
            positions: Positions::new(),
            backoff: Backoff::default(),
            client: None,
            retry_at: None,
            connected_before: false,
            duplicates: 0,
            events: VecDeque::new(),
            device: None,
            handed: None,
            unacknowledged: HashMap::new(),
            last_acknowledged: None,
        }
    }

    /// Connects to any of `urls` (several nodes without a load balancer):
    /// the first, then, after each failed attempt, the next.
    pub fn with_urls(mut self, urls: Vec<String>) -> Subscriber {
        if !urls.is_empty() {
            self.urls = urls;
            self.url_index = 0;
        }
        self
    }

    /// The URL the subscriber is (or will next be) connected to.
    pub fn url(&self) -> &str {
        &self.urls[self.url_index]
    }

    /// Connects with this TLS configuration and bearer token.
    pub fn with_auth(
        mut self,
        tls: Option<Arc<rustls::ClientConfig>>,
        token: Option<String>,
    ) -> Subscriber {
        self.tls = tls;
        self.token = token;
        self
    }

    /// Connects as device `id` (`?device=ID`) and acknowledges what the
    /// application has processed (a delivery counts as processed when
    /// [`Subscriber::next`] is called again), at most every 100 ms: the
    /// server keeps those positions for the device, so after an app
    /// restart that lost its own, it subscribes from where it was.
    pub fn with_device(mut self, id: impl Into<String>) -> Subscriber {
        let id = id.into();
        let encoded: String = form_urlencoded_byte(&id);
        for url in &mut self.urls {
            let separator = if url.contains('?') { '&' } else { '?' };
            url.push_str(&format!("{separator}device={encoded}"));
        }
        self.device = Some(id);
        self
    }

    /// Sends the device's pending acknowledgements now (also done on
    /// [`Subscriber::close`]).
    pub async fn acknowledge(&mut self) {
        self.mark_processed();
        if self.unacknowledged.is_empty() || self.device.is_none() {
            return;
        }
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let request = v1::Acknowledge {
            streams: self.unacknowledged.drain().map(|(_, ack)| ack).collect(),
        };
        let frame = Frame::new(opcode::ACKNOWLEDGE, request.encode_to_vec());
        // Lost with the connection: the server then has older positions,
        // and the device gets a few messages again (dropped as duplicates).
        let _ = client.send(&frame).await;
        self.last_acknowledged = Some(tokio::time::Instant::now());
    }

    /// The delivery handed out last is processed: acknowledge it next time.
    fn mark_processed(&mut self) {
        if let Some(handed) = self.handed.take() {
            self.unacknowledged.insert(ack_key(&handed), handed);
        }
    }

    /// A redelivered copy of a processed delivery means its acknowledgement
    /// was lost (sent on a connection that then dropped): acknowledged
    /// again, or the server would keep sending it.
    fn reacknowledge(&mut self, delivery: &v1::Delivery) {
        if self.device.is_none() {
            return;
        }
        let ack = ack_of(delivery);
        if self.handed.as_ref() == Some(&ack) {
            return; // Handed out, not processed yet.
        }
        // A pending acknowledgement of the stream is a later position.
        self.unacknowledged.entry(ack_key(&ack)).or_insert(ack);
    }

    /// Starts from saved positions (e.g. persisted by the application).
    pub fn with_positions(mut self, positions: Positions) -> Subscriber {
        self.positions = positions;
        self
    }

    /// Reconnects with this back-off.
    pub fn with_backoff(mut self, backoff: Backoff) -> Subscriber {
        self.backoff = backoff;
        self
    }

    /// The positions kept so far.
    pub fn positions(&self) -> &Positions {
        &self.positions
    }

    /// Deliveries dropped because their position was seen already.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Drops the connection as if it had failed (tests use it to simulate
    /// a network change); the next call to [`Subscriber::next`] reconnects.
    pub fn disconnect(&mut self) {
        self.client = None;
    }

    /// The next event, connecting or reconnecting as needed.
    ///
    /// # Errors
    /// Only for what retrying cannot fix: an invalid URL or token, an
    /// upgrade refused for a reason other than load (401, 403, 404...), a
    /// web page instead of a WebSocket, or a subscription or join the
    /// server refuses (an ERROR frame, such as PERMISSION_DENIED).
    pub async fn next(&mut self) -> Result<Event, ClientError> {
        if self.device.is_some() {
            self.mark_processed();
            let due = self
                .last_acknowledged
                .is_none_or(|at| at.elapsed() >= ACKNOWLEDGE_EVERY);
            if due {
                self.acknowledge().await;
            }
        }
        let event = self.next_event().await?;
        if let Event::Delivery(delivery) = &event {
            if self.device.is_some() && delivery.seq > 0 && !delivery.epoch.is_empty() {
                self.handed = Some(ack_of(delivery));
            }
        }
        Ok(event)
    }

    async fn next_event(&mut self) -> Result<Event, ClientError> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Ok(event);
            }
            let Some(client) = self.client.as_mut() else {
                if let Some(at) = self.retry_at.take() {
                    tokio::time::sleep_until(at).await;
                }
                match self.connect().await {
                    Ok(()) => continue,
                    Err(err) if fatal(&err) => return Err(err),
                    Err(err) => {
                        self.url_index = (self.url_index + 1) % self.urls.len();
                        return Ok(self.lost(err));
                    }
                }
            };
            // What was processed is acknowledged within
            // ACKNOWLEDGE_EVERY even when nothing more arrives (else the
            // server would redeliver it).
            let ack_wait = match self.device.is_some() && !self.unacknowledged.is_empty() {
                true => Some(self.last_acknowledged.map_or(Duration::ZERO, |at| {
                    ACKNOWLEDGE_EVERY.saturating_sub(at.elapsed())
                })),
                false => None,
            };
            let received = match ack_wait {
                Some(wait) => client.recv_timeout(wait).await,
                None => client.recv().await,
            };
            let frame = match received {
                Ok(frame) => frame,
                Err(ClientError::Timeout(_)) if ack_wait.is_some() => {
                    self.acknowledge().await;
                    continue;
                }
                Err(err) => return Ok(self.lost(err)),
            };
            match self.event(frame) {
                Some(event) => return Ok(event),
                None => continue,
            }
        }
    }

    /// Closes the connection with 1000; no reconnect follows unless
    /// [`Subscriber::next`] is called again.
    pub async fn close(&mut self) {
        self.acknowledge().await;
        if let Some(client) = self.client.take() {
            let _ = client.close(1000).await;
        }
    }

    fn lost(&mut self, err: ClientError) -> Event {
        self.client = None;
        // A draining server says when to come back; the back-off's jitter
        // still spreads its clients within that.
        let retry_in = self.backoff.next_delay() + reconnect_hint(&err).unwrap_or_default();
        self.retry_at = Some(tokio::time::Instant::now() + retry_in);
        Event::Disconnected {
            error: err.to_string(),
            retry_in,
        }
    }

    async fn connect(&mut self) -> Result<(), ClientError> {
        let mut client =
            Client::connect_with_token(self.url(), self.tls.clone(), self.token.as_deref()).await?;
        client.welcome().await?;
        let mut streams = Vec::new();
        if !self.topics.is_empty() {
            let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
            let reply = client.subscribe_since(&topics, &self.positions).await?;
            streams.extend(reply.streams);
        }
        for room in &self.rooms {
            let presence = client.join_since(room, true, &self.positions).await?;
            streams.extend(presence.stream);
        }
        // Missed messages came before the replies and wait in the client;
        // they are observed (and positions advanced) before the states
        // below are recorded for streams without a position.
        let mut early = Vec::new();
        while let Some(frame) = client.pending_frame() {
            early.push(frame);
        }
        for frame in early {
            if let Some(event) = self.event(frame) {
                self.events.push_back(event);
            }
        }
        for state in &streams {
            self.positions.record(state);
        }
        let subscribed = Event::Subscribed {
            streams,
            reconnected: self.connected_before,
        };
        // The report comes first, then what was recovered.
        self.events.push_front(subscribed);
        self.connected_before = true;
        self.backoff.reset();
        self.client = Some(client);
        Ok(())
    }

    fn event(&mut self, frame: Frame) -> Option<Event> {
        match frame.opcode {
            opcode::DELIVERY => {
                let Ok(delivery) = v1::Delivery::decode(frame.payload.clone()) else {
                    return Some(Event::Frame(frame));
                };
                match self.positions.observe(&delivery) {
                    Observed::Duplicate => {
                        self.duplicates += 1;
                        if delivery.redelivered {
                            self.reacknowledge(&delivery);
                        }
                        None
                    }
                    Observed::New | Observed::Unnumbered => Some(Event::Delivery(delivery)),
                }
            }
            opcode::GAP => match v1::Gap::decode(frame.payload.clone()) {
                Ok(gap) => Some(Event::Gap(gap)),
                Err(_) => Some(Event::Frame(frame)),
            },
            _ => Some(Event::Frame(frame)),
        }
    }
}

/// The delay a server that closed with 1001 asked for (`... reconnect
/// after N ms`), if it did.
fn reconnect_hint(err: &ClientError) -> Option<Duration> {
    let ClientError::Closed { code: 1001, reason } = err else {
        return None;
    };
    let ms = reason
        .split("reconnect after ")
        .nth(1)?
        .strip_suffix(" ms")?;
    ms.parse().ok().map(Duration::from_millis)
}

/// The acknowledgement of `delivery`'s stream up to it.
fn ack_of(delivery: &v1::Delivery) -> v1::StreamAck {
    v1::StreamAck {
        topic: delivery.topic.clone(),
        room: delivery.room.clone(),
        position: Some(v1::Position {
            epoch: delivery.epoch.clone(),
            seq: delivery.seq,
        }),
        user: delivery.kind == i32::from(v1::delivery::Kind::Direct),
    }
}

/// The stream an acknowledgement is for, as pending ones are kept.
fn ack_key(ack: &v1::StreamAck) -> String {
    format!("{}:{}:{}", ack.topic, ack.room, ack.user)
}

/// `s` percent-encoded for a URL query.
fn form_urlencoded_byte(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Whether reconnecting could not help.
fn fatal(err: &ClientError) -> bool {
    match err {
        // The server could not serve the request now (its broker is
        // unreachable): worth retrying.
        ClientError::ErrorFrame { code, .. } => *code != wsproto::ErrorCode::Unavailable as u32,
        ClientError::Url { .. } | ClientError::InvalidToken | ClientError::WebPage { .. } => true,
        // Busy (429) and unavailable (5xx) pass; the rest will not.
        ClientError::Refused { status, .. } => *status != 429 && *status < 500,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(topic: &str, epoch: &str, seq: u64) -> v1::Delivery {
        v1::Delivery {
            kind: v1::delivery::Kind::Topic.into(),
            topic: topic.into(),
            epoch: epoch.into(),
            seq,
            ..Default::default()
        }
    }

    #[test]
    fn a_draining_servers_reconnect_hint_is_read_from_its_close() {
        let closed = |code, reason: &str| ClientError::Closed {
            code,
            reason: reason.into(),
        };
        let hint = closed(1001, "server shutting down; reconnect after 375 ms");
        assert_eq!(reconnect_hint(&hint), Some(Duration::from_millis(375)));
        assert_eq!(reconnect_hint(&closed(1001, "server shutting down")), None);
        assert_eq!(reconnect_hint(&closed(4000, "reconnect after 5 ms")), None);
    }

    #[test]
    fn a_seen_position_is_a_duplicate_and_a_new_epoch_is_not() {
        let mut positions = Positions::new();
        assert_eq!(positions.observe(&delivery("a.b", "e1", 1)), Observed::New);
        assert_eq!(positions.observe(&delivery("a.b", "e1", 2)), Observed::New);
        assert_eq!(
            positions.observe(&delivery("a.b", "e1", 2)),
            Observed::Duplicate
        );
        assert_eq!(
            positions.observe(&delivery("a.b", "e1", 1)),
            Observed::Duplicate
        );
        assert_eq!(positions.observe(&delivery("a.b", "e2", 1)), Observed::New);
        assert_eq!(positions.observe(&delivery("a.c", "e1", 1)), Observed::New);
        assert_eq!(
            positions.observe(&delivery("a.b", "", 0)),
            Observed::Unnumbered
        );
    }

    #[test]
    fn since_holds_the_streams_the_subscription_covers() {
        let mut positions = Positions::new();
        for topic in ["rowdata.temp.1", "rowdata.hum.2", "alarms"] {
            positions.observe(&delivery(topic, "e", 3));
        }
        let since = positions.topics_covered_by(&["rowdata.temp.*"]);
        assert_eq!(since.keys().collect::<Vec<_>>(), ["rowdata.temp.1"]);
        assert_eq!(positions.topics_covered_by(&["rowdata.#"]).len(), 2);
        assert_eq!(positions.topics_covered_by(&["#"]).len(), 3);
    }

    #[test]
    fn a_reported_position_moves_recovery_on_but_never_drops_a_delivery() {
        let mut positions = Positions::new();
        positions.observe(&delivery("a", "e1", 5));
        let state = |topic: &str, seq| v1::StreamState {
            topic: topic.into(),
            position: Some(v1::Position {
                epoch: "e1".into(),
                seq,
            }),
            ..Default::default()
        };
        positions.record(&state("a", 3));
        assert_eq!(positions.topic("a").unwrap().seq, 5, "never backwards");
        positions.record(&state("a", 9));
        positions.record(&state("b", 9));
        assert_eq!(positions.topic("a").unwrap().seq, 9);
        assert_eq!(positions.topic("b").unwrap().seq, 9);
        // A message the report was ahead of still gets through, once.
        assert_eq!(positions.observe(&delivery("b", "e1", 8)), Observed::New);
        assert_eq!(
            positions.observe(&delivery("b", "e1", 8)),
            Observed::Duplicate
        );
        assert_eq!(positions.topic("b").unwrap().seq, 9);
    }
}
