//! A delivery checker for fault tests and benchmarks: given what one
//! client received (after its own duplicate dropping) and the GAP notices
//! it got, counts per stream what was lost, duplicated, reordered, and —
//! the worst case — silently missing: neither delivered nor announced.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::time::Instant;
use wsproto::proto::v1;

use crate::{Event, Subscriber};

/// What one client saw of each stream.
#[derive(Debug, Default, Clone)]
pub struct Checker {
    streams: HashMap<String, Seen>,
}

#[derive(Debug, Default, Clone)]
struct Seen {
    /// Sequence numbers delivered, per epoch, with how many times.
    delivered: HashMap<String, BTreeMap<u64, u32>>,
    /// Ranges announced missing (epoch, from, to; to 0: open-ended).
    announced: Vec<(String, u64, u64)>,
    /// Deliveries whose seq was below one delivered before (same epoch).
    reordered: u64,
    last: Option<(String, u64)>,
}

/// The verdict on one stream, or summed over streams and clients.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Messages delivered (counting each once).
    pub delivered: u64,
    /// Extra copies delivered.
    pub duplicated: u64,
    /// Deliveries that came after a later one.
    pub reordered: u64,
    /// Messages not delivered but announced by a GAP.
    pub announced: u64,
    /// Messages neither delivered nor announced.
    pub silently_missing: u64,
}

impl Report {
    /// Messages not delivered, announced or not.
    pub fn lost(&self) -> u64 {
        self.announced + self.silently_missing
    }

    /// Adds `other` to this report.
    pub fn add(&mut self, other: Report) {
        self.delivered += other.delivered;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
        self.announced += other.announced;
        self.silently_missing += other.silently_missing;
    }
}

/// `t:TOPIC`, `r:ROOM`, or `u` for the user's stream of critical pushes.
fn stream_of(topic: &str, room: &str, user: bool) -> String {
    match (user, room.is_empty()) {
        (true, _) => "u".to_owned(),
        (false, true) => format!("t:{topic}"),
        (false, false) => format!("r:{room}"),
    }
}

impl Checker {
    /// An empty checker.
    pub fn new() -> Checker {
        Checker::default()
    }

    /// Records a delivery the application received.
    pub fn delivery(&mut self, delivery: &v1::Delivery) {
        if delivery.seq == 0 {
            return;
        }
        let seen = self
            .streams
            .entry(stream_of(
                &delivery.topic,
                &delivery.room,
                delivery.kind == i32::from(v1::delivery::Kind::Direct),
            ))
            .or_default();
        if let Some((epoch, last)) = &seen.last {
            if *epoch == delivery.epoch && delivery.seq <= *last {
                seen.reordered += u64::from(delivery.seq < *last);
            }
        }
        seen.last = Some((delivery.epoch.clone(), delivery.seq));
        *seen
            .delivered
            .entry(delivery.epoch.clone())
            .or_default()
            .entry(delivery.seq)
            .or_default() += 1;
    }

    /// Records a GAP notice.
    pub fn gap(&mut self, gap: &v1::Gap) {
        let seen = self
            .streams
            .entry(stream_of(&gap.topic, &gap.room, gap.user))
            .or_default();
        seen.announced
            .push((gap.epoch.clone(), gap.from_seq, gap.to_seq));
    }

    /// The highest seq delivered in `stream` (`t:TOPIC`, `r:ROOM` or `u`)
    /// in `epoch`.
    pub fn last_seq(&self, stream: &str, epoch: &str) -> u64 {
        self.streams
            .get(stream)
            .and_then(|s| s.delivered.get(epoch))
            .and_then(|seqs| seqs.keys().next_back().copied())
            .unwrap_or(0)
    }

    /// The verdict on `stream`, given what was published to it: in each
    /// epoch, every seq from `first` to `last` (the messages the client
    /// should have had, e.g. from its subscription on).
    pub fn report(&self, stream: &str, published: &[(String, u64, u64)]) -> Report {
        let seen = self.streams.get(stream).cloned().unwrap_or_default();
        let mut report = Report {
            reordered: seen.reordered,
            ..Report::default()
        };
        for (epoch, first, last) in published {
            let delivered = seen.delivered.get(epoch);
            for seq in *first..=*last {
                match delivered.and_then(|d| d.get(&seq)) {
                    Some(copies) => {
                        report.delivered += 1;
                        report.duplicated += u64::from(copies - 1);
                    }
                    None => {
                        let covered = seen.announced.iter().any(|(e, from, to)| {
                            e == epoch && seq >= *from && (*to == 0 || seq <= *to)
                        });
                        match covered {
                            true => report.announced += 1,
                            false => report.silently_missing += 1,
                        }
                    }
                }
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(seq: u64) -> v1::Delivery {
        v1::Delivery {
            topic: "a".into(),
            epoch: "e".into(),
            seq,
            ..Default::default()
        }
    }

    #[test]
    fn counts_every_kind_of_fault() {
        let mut checker = Checker::new();
        for seq in [1, 2, 2, 4, 3, 8] {
            checker.delivery(&delivery(seq));
        }
        checker.gap(&v1::Gap {
            topic: "a".into(),
            epoch: "e".into(),
            from_seq: 5,
            to_seq: 6,
            ..Default::default()
        });
        let report = checker.report("t:a", &[("e".into(), 1, 9)]);
        assert_eq!(
            report,
            Report {
                delivered: 5,
                duplicated: 1,
                reordered: 1,
                announced: 2,
                silently_missing: 2,
            }
        );
        assert_eq!(report.lost(), 4);
        assert_eq!(checker.last_seq("t:a", "e"), 8);
    }
}

/// The ranges a publisher's accepted positions cover, per epoch:
/// (epoch, first seq, last seq), as [`Checker::report`] takes them.
pub fn accepted_ranges(accepted: &[(String, u64)]) -> Vec<(String, u64, u64)> {
    let mut ranges: Vec<(String, u64, u64)> = Vec::new();
    for (epoch, seq) in accepted {
        match ranges.iter_mut().find(|(e, _, _)| e == epoch) {
            Some(range) => {
                range.1 = range.1.min(*seq);
                range.2 = range.2.max(*seq);
            }
            None => ranges.push((epoch.clone(), *seq, *seq)),
        }
    }
    ranges
}

/// What one device saw in a [`follow`] run.
#[derive(Debug)]
pub struct DeviceRun {
    /// Its checker, to [`Checker::report`] on.
    pub checker: Checker,
    /// For each reconnect: how long after losing its connection it had
    /// every message accepted before it reconnected.
    pub catch_ups: Vec<Duration>,
    /// Connections lost (dropped on purpose or not).
    pub reconnects: u64,
}

/// What [`follow`] shares with the run around it.
#[derive(Clone, Default)]
pub struct Shared {
    /// Devices subscribed for the first time.
    pub ready: Arc<AtomicU64>,
    /// (epoch, seq) of every message the publisher got accepted, in order.
    pub accepted: Arc<Mutex<Vec<(String, u64)>>>,
    /// Set when the run is over.
    pub done: Arc<AtomicBool>,
    /// Set once the publisher is done: `accepted` is final.
    pub published_all: Arc<AtomicBool>,
    /// Devices that have had the last accepted message since
    /// `published_all` was set.
    pub caught_up: Arc<AtomicU64>,
}

/// Runs one device: feeds everything `subscriber` hands out for `stream`
/// (`t:TOPIC`, or `u` for its user's critical pushes) to a checker until `shared.done`, dropping its connection at
/// a random moment of every `drop_every` (as a phone changing networks
/// does) when given.
pub async fn follow(
    mut subscriber: Subscriber,
    stream: String,
    shared: Shared,
    drop_every: Option<Duration>,
) -> DeviceRun {
    let mut run = DeviceRun {
        checker: Checker::new(),
        catch_ups: Vec::new(),
        reconnects: 0,
    };
    let mut backoff = crate::backoff::Backoff::new(Duration::ZERO, Duration::ZERO);
    let mut next_drop = drop_every.map(|every| Instant::now() + jitter(&mut backoff, every));
    let mut lost_at: Option<Instant> = None;
    let mut catching_up: Option<(Instant, String, u64)> = None;
    let mut first = true;
    let mut counted_caught_up = false;
    loop {
        let wake = next_drop.map_or(Duration::from_millis(200), |at| {
            at.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200))
        });
        let event = match tokio::time::timeout(wake, subscriber.next()).await {
            Ok(Ok(event)) => Some(event),
            Ok(Err(_)) => break,
            Err(_) => None,
        };
        if shared.done.load(Ordering::Relaxed) {
            break;
        }
        if let (Some(at), Some(every)) = (next_drop, drop_every) {
            if Instant::now() >= at {
                subscriber.disconnect();
                lost_at.get_or_insert_with(Instant::now);
                run.reconnects += 1;
                next_drop = Some(Instant::now() + jitter(&mut backoff, every));
            }
        }
        match event {
            Some(Event::Subscribed { .. }) if first => {
                first = false;
                shared.ready.fetch_add(1, Ordering::Relaxed);
            }
            Some(Event::Subscribed { .. }) => {
                let target = shared.accepted.lock().unwrap().last().cloned();
                if let (Some(lost), Some((epoch, seq))) = (lost_at.take(), target) {
                    catching_up = Some((lost, epoch, seq));
                }
            }
            Some(Event::Delivery(delivery)) => run.checker.delivery(&delivery),
            Some(Event::Gap(gap)) => run.checker.gap(&gap),
            Some(Event::Disconnected { .. }) => {
                if lost_at.is_none() {
                    lost_at = Some(Instant::now());
                    run.reconnects += 1;
                }
            }
            Some(Event::Frame(_)) | None => {}
        }
        if let Some((lost, epoch, seq)) = &catching_up {
            if run.checker.last_seq(&stream, epoch) >= *seq {
                run.catch_ups.push(lost.elapsed());
                catching_up = None;
            }
        }
        if !counted_caught_up && shared.published_all.load(Ordering::Relaxed) {
            let last = shared.accepted.lock().unwrap().last().cloned();
            if last.is_none_or(|(epoch, seq)| run.checker.last_seq(&stream, &epoch) >= seq) {
                counted_caught_up = true;
                shared.caught_up.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    subscriber.close().await;
    run
}

/// A moment uniform in `[0, every]`.
fn jitter(random: &mut crate::backoff::Backoff, every: Duration) -> Duration {
    every.mul_f64(random.unit())
}
