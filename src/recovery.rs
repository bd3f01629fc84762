//! Recovery: what a session that (re)subscribes or (re)joins with the last
//! position it saw has missed, and how it is told.
//!
//! The order of the steps is what makes recovery exact: the session's
//! queue starts holding the stream's live deliveries, the subscription is
//! registered, history is read, and only then are the missed messages
//! queued, followed by the held live ones minus those history already had.
//! Nothing published meanwhile is lost (it is held or in history) or
//! doubled (positions are compared), and missed messages come first.
//! What cannot be recovered is said: `recovered = false` in the reply and a
//! GAP frame before anything else of the stream.

use prost::Message as _;
use wsproto_proto::v1;

use crate::{
    broker::{BrokerError, History, Position, Target},
    frame::Frame,
    hub::delivery_frame,
    opcode,
    queue::Replay,
};

pub use crate::broker::MAX_REPLAY;

/// What to send a recovering session for one stream, and what to tell it.
pub(crate) struct Plan {
    pub replay: Replay,
    pub state: v1::StreamState,
}

/// Works out what a session at `since` (none: a fresh subscription) has
/// missed in `stream`, given a history read made after its subscription
/// was registered.
pub(crate) fn plan(
    stream: &Target,
    since: Option<&Position>,
    history: Result<History, BrokerError>,
) -> Plan {
    let (topic, room) = names(stream);
    let gap = |epoch: &str, from_seq: u64, to_seq: u64, reason: &str| {
        let gap = v1::Gap {
            topic: topic.clone(),
            room: room.clone(),
            epoch: epoch.to_owned(),
            from_seq,
            to_seq,
            reason: reason.to_owned(),
            user: matches!(stream, Target::UserStream(_)),
        };
        Some(Frame::new(opcode::GAP, gap.encode_to_vec()).encode())
    };
    let state = |position: &Position, recovered: bool, replayed: usize| v1::StreamState {
        topic: topic.clone(),
        room: room.clone(),
        position: Some(v1::Position {
            epoch: position.epoch.to_string(),
            seq: position.seq,
        }),
        recovered,
        replayed: replayed as u32,
    };
    let history = match history {
        Ok(history) => history,
        Err(_) => {
            // Nothing can be said about the stream now: the client must
            // not take the silence for "nothing missed".
            let replay = Replay {
                notice: since.and_then(|p| gap(&p.epoch, p.seq + 1, 0, "unavailable")),
                ..Replay::default()
            };
            let position = since.cloned().unwrap_or_default();
            return Plan {
                replay,
                state: state(&position, since.is_none(), 0),
            };
        }
    };
    let current = Position::new(history.epoch.clone(), history.top);
    let missed: Vec<(Position, bytes::Bytes)> = history
        .publications
        .iter()
        .map(|(seq, publication)| {
            let position = Position::new(history.epoch.clone(), *seq);
            let frame = delivery_frame(publication, &position, true);
            (position, frame)
        })
        .collect();
    match since {
        // A fresh subscription has missed nothing.
        None => Plan {
            replay: Replay::default(),
            state: state(&current, true, 0),
        },
        Some(seen) if seen.epoch == history.epoch => {
            if seen.seq >= history.top {
                return Plan {
                    replay: Replay {
                        seen: Some(seen.clone()),
                        ..Replay::default()
                    },
                    state: state(&current, true, 0),
                };
            }
            let first = missed.first().map(|(p, _)| p.seq);
            let last = missed.last().map(|(p, _)| p.seq);
            let recovered = first == Some(seen.seq + 1) && last == Some(history.top);
            let notice = match recovered {
                true => None,
                // The missing range ends where what history still has begins.
                false => gap(
                    &seen.epoch,
                    seen.seq + 1,
                    first.map_or(history.top, |f| f - 1),
                    "history",
                ),
            };
            let replayed = missed.len();
            Plan {
                replay: Replay {
                    seen: Some(seen.clone()),
                    notice,
                    missed,
                    critical: false,
                },
                state: state(&current, recovered, replayed),
            }
        }
        // The stream restarted: the client's position means nothing now.
        // Whatever the new epoch kept is new to it.
        Some(seen) => {
            let replayed = missed.len();
            Plan {
                replay: Replay {
                    seen: None,
                    notice: gap(&seen.epoch, seen.seq + 1, 0, "epoch"),
                    missed,
                    critical: false,
                },
                state: state(&current, false, replayed),
            }
        }
    }
}

fn names(stream: &Target) -> (String, String) {
    match stream {
        Target::Topic(topic) => (topic.to_string(), String::new()),
        Target::Room { room, .. } => (String::new(), room.to_string()),
        _ => (String::new(), String::new()),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::{broker::Publication, topic::Topic};

    fn stream() -> Target {
        Target::Topic(Topic::parse("alarms").unwrap())
    }

    fn history(epoch: &str, top: u64, kept: impl IntoIterator<Item = u64>) -> History {
        History {
            epoch: epoch.into(),
            top,
            publications: kept
                .into_iter()
                .map(|seq| (seq, Publication::new(stream(), None, Bytes::from("x"))))
                .collect(),
        }
    }

    fn gap_of(plan: &Plan) -> Option<v1::Gap> {
        let frame = plan.replay.notice.clone()?;
        Some(Frame::decode(frame).unwrap().message().unwrap())
    }

    #[test]
    fn a_range_still_in_history_is_recovered_whole() {
        let plan = plan(
            &stream(),
            Some(&Position::new("e1", 4)),
            Ok(history("e1", 9, 5..=9)),
        );
        assert!(plan.state.recovered);
        assert_eq!(plan.state.replayed, 5);
        assert!(plan.replay.notice.is_none());
        let seqs: Vec<u64> = plan.replay.missed.iter().map(|(p, _)| p.seq).collect();
        assert_eq!(seqs, [5, 6, 7, 8, 9]);
    }

    #[test]
    fn a_range_partly_out_of_history_is_a_gap_then_what_is_left() {
        let plan = plan(
            &stream(),
            Some(&Position::new("e1", 2)),
            Ok(history("e1", 9, 6..=9)),
        );
        assert!(!plan.state.recovered);
        let gap = gap_of(&plan).unwrap();
        assert_eq!(
            (gap.from_seq, gap.to_seq, gap.reason.as_str()),
            (3, 5, "history")
        );
        assert_eq!(plan.replay.missed.len(), 4);
    }

    #[test]
    fn another_epoch_is_never_taken_for_a_continuation() {
        let plan = plan(
            &stream(),
            Some(&Position::new("old", 7)),
            Ok(history("new", 2, 1..=2)),
        );
        assert!(!plan.state.recovered);
        let gap = gap_of(&plan).unwrap();
        assert_eq!(
            (gap.epoch.as_str(), gap.from_seq, gap.to_seq),
            ("old", 8, 0)
        );
        assert_eq!(gap.reason, "epoch");
        assert_eq!(plan.replay.missed.len(), 2, "the new epoch's messages");
        assert!(plan.replay.seen.is_none());
    }

    #[test]
    fn nothing_missed_and_fresh_subscriptions_are_recovered() {
        let up_to_date = plan(
            &stream(),
            Some(&Position::new("e1", 9)),
            Ok(history("e1", 9, [])),
        );
        assert!(up_to_date.state.recovered && up_to_date.replay.notice.is_none());
        let fresh = plan(&stream(), None, Ok(history("e1", 9, [])));
        assert!(fresh.state.recovered);
        assert_eq!(fresh.state.position.unwrap().seq, 9);
    }

    #[test]
    fn no_history_kept_means_an_announced_gap() {
        let plan = plan(
            &stream(),
            Some(&Position::new("e1", 3)),
            Ok(history("e1", 5, [])),
        );
        assert!(!plan.state.recovered);
        let gap = gap_of(&plan).unwrap();
        assert_eq!((gap.from_seq, gap.to_seq), (4, 5));
    }

    #[test]
    fn an_unreadable_history_is_announced_too() {
        let plan = plan(
            &stream(),
            Some(&Position::new("e1", 3)),
            Err(BrokerError::Unavailable("down".into())),
        );
        assert!(!plan.state.recovered);
        assert_eq!(gap_of(&plan).unwrap().reason, "unavailable");
    }
}
