//! A delivery checker for fault tests and benchmarks: given what one
//! client received (after its own duplicate dropping) and the GAP notices
//! it got, counts per stream what was lost, duplicated, reordered, and —
//! the worst case — silently missing: neither delivered nor announced.

use std::collections::{BTreeMap, HashMap};

use wsproto::proto::v1;

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

fn stream_of(topic: &str, room: &str) -> String {
    match room.is_empty() {
        true => format!("t:{topic}"),
        false => format!("r:{room}"),
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
            .entry(stream_of(&delivery.topic, &delivery.room))
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
            .entry(stream_of(&gap.topic, &gap.room))
            .or_default();
        seen.announced
            .push((gap.epoch.clone(), gap.from_seq, gap.to_seq));
    }

    /// The highest seq delivered in `stream` (`t:TOPIC` or `r:ROOM`) in
    /// `epoch`.
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
