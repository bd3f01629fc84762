//! Topic names, topic patterns, and the index of subscriptions by pattern.
//!
//! A topic name is segments joined by `.` (`rowdata.temp.42`). A pattern may
//! also use `*` for exactly one segment and, as its last segment, `#` for
//! zero or more. A publication to X (a name or a pattern) reaches every
//! subscription S such that some topic name matches both X and S: so a
//! backend reaches every client of a business type with `rowdata.temp.#`,
//! and one business id with `rowdata.temp.42`.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    hash::Hash,
    sync::Arc,
};

/// Longest topic or pattern, in bytes.
pub const MAX_TOPIC_LEN: usize = 200;
/// Most segments in a topic or pattern.
pub const MAX_SEGMENTS: usize = 16;

/// Why a string is not a valid topic or pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The string is empty.
    #[error("topic is empty")]
    Empty,
    /// Longer than [`MAX_TOPIC_LEN`] bytes.
    #[error("topic is longer than {MAX_TOPIC_LEN} bytes")]
    TooLong,
    /// More than [`MAX_SEGMENTS`] dot-separated segments.
    #[error("topic has more than {MAX_SEGMENTS} segments")]
    TooManySegments,
    /// Two dots in a row, or a leading or trailing dot.
    #[error("topic {0:?} has an empty segment")]
    EmptySegment(String),
    /// A wildcard shares its segment with other characters (`a*`).
    #[error("topic {0:?}: wildcards `*` and `#` must be whole segments")]
    PartialWildcard(String),
    /// `#` appears before the last segment.
    #[error("topic {0:?}: `#` may only be the last segment")]
    MisplacedHash(String),
    /// Whitespace or a control character anywhere in the string.
    #[error("topic {0:?} contains whitespace or a control character")]
    InvalidCharacter(String),
}

/// A validated topic name or pattern; cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Arc<str>);

impl Topic {
    /// Validates `s` as a topic name or pattern.
    ///
    /// # Errors
    /// A [`TopicError`] saying what is wrong.
    pub fn parse(s: &str) -> Result<Topic, TopicError> {
        if s.is_empty() {
            return Err(TopicError::Empty);
        }
        if s.len() > MAX_TOPIC_LEN {
            return Err(TopicError::TooLong);
        }
        let segments: Vec<&str> = s.split('.').collect();
        if segments.len() > MAX_SEGMENTS {
            return Err(TopicError::TooManySegments);
        }
        for (i, segment) in segments.iter().enumerate() {
            if segment.is_empty() {
                return Err(TopicError::EmptySegment(s.to_owned()));
            }
            if segment.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(TopicError::InvalidCharacter(s.to_owned()));
            }
            if segment.len() > 1 && segment.contains(['*', '#']) {
                return Err(TopicError::PartialWildcard(s.to_owned()));
            }
            if *segment == "#" && i + 1 != segments.len() {
                return Err(TopicError::MisplacedHash(s.to_owned()));
            }
        }
        Ok(Topic(s.into()))
    }

    /// The topic as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for a plain name (no `*` or `#`).
    pub fn is_name(&self) -> bool {
        self.segments().all(|s| s != "*" && s != "#")
    }

    /// The `.`-separated segments.
    pub fn segments(&self) -> std::str::Split<'_, char> {
        self.0.split('.')
    }

    /// Whether every name matching `other` also matches `self`.
    pub fn covers(&self, other: &Topic) -> bool {
        let a: Vec<&str> = self.segments().collect();
        let b: Vec<&str> = other.segments().collect();
        covers(&a, &b)
    }

    /// Whether some topic name matches both `self` and `other`: the rule
    /// deciding whether a publication reaches a subscription.
    pub fn overlaps(&self, other: &Topic) -> bool {
        let a: Vec<&str> = self.segments().collect();
        let b: Vec<&str> = other.segments().collect();
        overlap(&a, &b)
    }
}

/// Whether every name matching `inner` also matches `outer`: the rule for
/// permissions, so `rowdata.#` allows subscribing to `rowdata.*.42`.
fn covers(outer: &[&str], inner: &[&str]) -> bool {
    match (outer.split_first(), inner.split_first()) {
        (Some((&"#", _)), _) => true,
        (None, None) => true,
        (None, _) | (_, None) => false,
        (_, Some((&"#", _))) => false,
        (Some((x, outer)), Some((y, inner))) => (*x == "*" || x == y) && covers(outer, inner),
    }
}

fn overlap(a: &[&str], b: &[&str]) -> bool {
    match (a.split_first(), b.split_first()) {
        // `#` is always last and matches whatever remains, even nothing.
        (Some((&"#", _)), _) | (_, Some((&"#", _))) => true,
        (None, None) => true,
        (None, _) | (_, None) => false,
        (Some((x, a)), Some((y, b))) => (*x == "*" || *y == "*" || x == y) && overlap(a, b),
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Topic({:?})", &*self.0)
    }
}

impl std::str::FromStr for Topic {
    type Err = TopicError;

    fn from_str(s: &str) -> Result<Topic, TopicError> {
        Topic::parse(s)
    }
}

/// Subscriptions indexed by pattern, segment by segment, so a publication
/// visits only the branches that can overlap it rather than every pattern.
#[derive(Debug)]
pub struct TopicIndex<K> {
    root: Node<K>,
}

#[derive(Debug)]
struct Node<K> {
    /// Children by literal segment, `*` included.
    children: HashMap<Box<str>, Node<K>>,
    /// Subscribers whose pattern ends here.
    exact: HashSet<K>,
    /// Subscribers whose pattern ends here with `#`.
    rest: HashSet<K>,
}

impl<K> Default for Node<K> {
    fn default() -> Node<K> {
        Node {
            children: HashMap::new(),
            exact: HashSet::new(),
            rest: HashSet::new(),
        }
    }
}

impl<K> Node<K> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.exact.is_empty() && self.rest.is_empty()
    }
}

impl<K: Clone + Eq + Hash> Default for TopicIndex<K> {
    fn default() -> TopicIndex<K> {
        TopicIndex {
            root: Node::default(),
        }
    }
}

impl<K: Clone + Eq + Hash> TopicIndex<K> {
    /// An empty index.
    pub fn new() -> TopicIndex<K> {
        TopicIndex::default()
    }

    /// Adds `key`'s subscription to `pattern`; returns false if it was there.
    pub fn insert(&mut self, pattern: &Topic, key: K) -> bool {
        let mut node = &mut self.root;
        for segment in pattern.segments() {
            if segment == "#" {
                return node.rest.insert(key);
            }
            node = node.children.entry(segment.into()).or_default();
        }
        node.exact.insert(key)
    }

    /// Removes `key`'s subscription to `pattern`, pruning emptied branches so
    /// the index does not grow with topics nobody subscribes to any more.
    /// Returns false if it was not there.
    pub fn remove(&mut self, pattern: &Topic, key: &K) -> bool {
        let segments: Vec<&str> = pattern.segments().collect();
        remove_from(&mut self.root, &segments, key)
    }

    /// True when no subscription is indexed.
    pub fn is_empty(&self) -> bool {
        self.root.is_empty()
    }

    /// Every key with a subscription overlapping `topic` (a name or a
    /// pattern), each once.
    pub fn matching(&self, topic: &Topic) -> HashSet<K> {
        let segments: Vec<&str> = topic.segments().collect();
        let mut found = HashSet::new();
        collect(&self.root, &segments, &mut found);
        found
    }
}

fn remove_from<K: Eq + Hash>(node: &mut Node<K>, segments: &[&str], key: &K) -> bool {
    match segments.split_first() {
        None => node.exact.remove(key),
        Some((&"#", _)) => node.rest.remove(key),
        Some((segment, rest)) => {
            let Some(child) = node.children.get_mut(*segment) else {
                return false;
            };
            let removed = remove_from(child, rest, key);
            if child.is_empty() {
                node.children.remove(*segment);
            }
            removed
        }
    }
}

fn collect<K: Clone + Eq + Hash>(node: &Node<K>, segments: &[&str], found: &mut HashSet<K>) {
    // A subscription ending in `#` here covers whatever the publication has left.
    found.extend(node.rest.iter().cloned());
    match segments.split_first() {
        None => found.extend(node.exact.iter().cloned()),
        // The publication covers this whole subtree.
        Some((&"#", _)) => collect_all(node, found),
        Some((&"*", rest)) => {
            for child in node.children.values() {
                collect(child, rest, found);
            }
        }
        Some((segment, rest)) => {
            if let Some(child) = node.children.get(*segment) {
                collect(child, rest, found);
            }
            if let Some(child) = node.children.get("*") {
                collect(child, rest, found);
            }
        }
    }
}

fn collect_all<K: Clone + Eq + Hash>(node: &Node<K>, found: &mut HashSet<K>) {
    found.extend(node.exact.iter().cloned());
    found.extend(node.rest.iter().cloned());
    for child in node.children.values() {
        collect_all(child, found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(s: &str) -> Topic {
        Topic::parse(s).unwrap()
    }

    #[test]
    fn names_and_patterns_are_validated() {
        for ok in [
            "alarm",
            "rowdata.temp.42",
            "a.*.c",
            "rowdata.#",
            "#",
            "*",
            "user:7.x-y",
        ] {
            assert!(Topic::parse(ok).is_ok(), "{ok}");
        }
        assert_eq!(Topic::parse(""), Err(TopicError::Empty));
        assert!(matches!(
            Topic::parse("a..b"),
            Err(TopicError::EmptySegment(_))
        ));
        assert!(matches!(
            Topic::parse(".a"),
            Err(TopicError::EmptySegment(_))
        ));
        assert!(matches!(
            Topic::parse("a.#.b"),
            Err(TopicError::MisplacedHash(_))
        ));
        assert!(matches!(
            Topic::parse("a.b*"),
            Err(TopicError::PartialWildcard(_))
        ));
        assert!(matches!(
            Topic::parse("a b"),
            Err(TopicError::InvalidCharacter(_))
        ));
        assert_eq!(Topic::parse(&"a".repeat(201)), Err(TopicError::TooLong));
        assert_eq!(
            Topic::parse(&["a"; 17].join(".")),
            Err(TopicError::TooManySegments)
        );
        assert!(t("a.b").is_name());
        assert!(!t("a.*").is_name());
    }

    #[test]
    fn overlap_rule() {
        let cases = [
            ("rowdata.temp.42", "rowdata.temp.42", true),
            ("rowdata.temp.42", "rowdata.temp.43", false),
            ("rowdata.temp.#", "rowdata.temp", true),
            ("rowdata.temp.#", "rowdata.temp.42", true),
            ("rowdata.temp.#", "rowdata.temp.42.x", true),
            ("rowdata.temp.#", "rowdata.hum.42", false),
            ("rowdata.temp", "rowdata.temp.42", false),
            ("rowdata.*.42", "rowdata.temp.42", true),
            ("rowdata.*.42", "rowdata.temp.#", true),
            ("rowdata.*", "rowdata", false),
            ("#", "anything.at.all", true),
            ("alarm.#", "alarm", true),
            ("a.*.c", "*.b.*", true),
            ("a.*.c", "*.b.d", false),
        ];
        for (a, b, expected) in cases {
            assert_eq!(t(a).overlaps(&t(b)), expected, "{a} vs {b}");
            assert_eq!(t(b).overlaps(&t(a)), expected, "{b} vs {a}");
        }
    }

    #[test]
    fn covers_rule() {
        let cases = [
            ("#", "anything.at.#", true),
            ("rowdata.#", "rowdata.*.42", true),
            ("rowdata.#", "rowdata", true),
            ("rowdata.*", "rowdata.temp", true),
            ("rowdata.*", "rowdata.*", true),
            ("rowdata.*", "rowdata.#", false),
            ("rowdata.temp", "rowdata.*", false),
            ("chat.*", "chat.a.b", false),
            ("a", "a", true),
        ];
        for (outer, inner, expected) in cases {
            assert_eq!(
                t(outer).covers(&t(inner)),
                expected,
                "{outer} covers {inner}"
            );
        }
    }

    #[test]
    fn index_finds_overlapping_subscriptions_once_each() {
        let mut index = TopicIndex::new();
        index.insert(&t("rowdata.temp.42"), 1);
        index.insert(&t("rowdata.temp.43"), 2);
        index.insert(&t("rowdata.#"), 3);
        index.insert(&t("rowdata.*.42"), 4);
        index.insert(&t("alarm"), 5);
        index.insert(&t("alarm.#"), 5);
        let found = |topic: &str| {
            let mut keys: Vec<i32> = index.matching(&t(topic)).into_iter().collect();
            keys.sort();
            keys
        };
        assert_eq!(found("rowdata.temp.42"), [1, 3, 4]);
        assert_eq!(found("rowdata.temp.#"), [1, 2, 3, 4]);
        assert_eq!(found("rowdata.hum.42"), [3, 4]);
        assert_eq!(found("alarm"), [5]);
        assert_eq!(found("#"), [1, 2, 3, 4, 5]);
        assert!(found("other").is_empty());
    }

    #[test]
    fn removing_every_subscription_empties_the_index() {
        let mut index = TopicIndex::new();
        let patterns = ["a.b.c", "a.b.#", "a.*.c", "#", "x"];
        for (i, p) in patterns.iter().enumerate() {
            assert!(index.insert(&t(p), i));
            assert!(!index.insert(&t(p), i));
        }
        for (i, p) in patterns.iter().enumerate() {
            assert!(index.remove(&t(p), &i));
            assert!(!index.remove(&t(p), &i));
        }
        assert!(index.is_empty());
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("*".to_owned())
        ]
    }

    fn pattern() -> impl Strategy<Value = Topic> {
        (proptest::collection::vec(segment(), 1..4), any::<bool>()).prop_map(
            |(mut segments, hash)| {
                if hash {
                    segments.push("#".into());
                }
                t(&segments.join("."))
            },
        )
    }

    proptest! {
        /// The index answers exactly what checking every pattern would.
        #[test]
        fn index_agrees_with_pairwise_overlap(subscriptions in proptest::collection::vec(pattern(), 0..12), publication in pattern()) {
            let mut index = TopicIndex::new();
            for (i, p) in subscriptions.iter().enumerate() {
                index.insert(p, i);
            }
            let expected: HashSet<usize> = subscriptions
                .iter()
                .enumerate()
                .filter(|(_, p)| p.overlaps(&publication))
                .map(|(i, _)| i)
                .collect();
            prop_assert_eq!(index.matching(&publication), expected);
        }
    }
}
