//! How a topic is named on each engine. Pure functions of the bytes, so every process that
//! shares a prefix agrees, and plain clients can compute the same names.
//!
//! - Redis: the channel is the prefix followed by the topic's bytes (Redis channels are
//!   binary-safe).
//! - NATS: the subject is `prefix.topic` when the topic is a *plain subject*: printable ASCII
//!   other than `%`, `*` and `>`, with no empty `.`-separated token. Any other topic is
//!   escaped as `prefix.` followed by the topic with every byte outside `A-Z a-z 0-9 - _ ~ + =
//!   , : ; ! @ # $ & ' ( ) [ ] { } | ^ `` ` `` / ? " \ <` written `%XX` (upper-case hex; `.`, `%`,
//!   `*`, `>`, space and non-ASCII bytes are all escaped), one token. A plain subject never
//!   holds a `%`, so the two forms never meet, and decoding is: a subject with `%` is escaped.
//!   A subject longer than [`MAX_SUBJECT_LEN`] (a long topic, which NATS's 4096-byte control
//!   line could not carry) is `prefix.%SHA1.` followed by the topic's SHA-1 in lower-case
//!   hex: plain clients can still compute it, and `%S` is no escape, so it meets neither form.

#![forbid(unsafe_code)]

#[cfg(feature = "nats")]
use sha1::{Digest, Sha1};

use crate::error::Error;

/// The longest subject fdcast puts on a NATS control line (`PUB <subject> <len>`), well
/// inside the server's default `max_control_line` of 4096.
#[cfg(feature = "nats")]
pub(crate) const MAX_SUBJECT_LEN: usize = 2048;
/// The longest prefix (`name`) a broker accepts.
pub(crate) const MAX_PREFIX_LEN: usize = 255;

/// The Redis channel of `topic`.
#[cfg(feature = "redis")]
pub(crate) fn redis_channel(prefix: &[u8], topic: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(prefix);
    out.extend_from_slice(topic);
}

/// A Redis channel prefix: up to 255 bytes, none of them NUL (it arrives as a C string).
#[cfg(feature = "redis")]
pub(crate) fn check_redis_prefix(prefix: &str) -> Result<(), Error> {
    if prefix.len() > MAX_PREFIX_LEN {
        return Err(Error::InvalidArgument(
            "a Redis channel prefix is at most 255 bytes",
        ));
    }
    Ok(())
}

/// A NATS subject prefix: 1 to 255 bytes of a plain subject (no wildcard, no empty token).
#[cfg(feature = "nats")]
pub(crate) fn check_nats_prefix(prefix: &str) -> Result<(), Error> {
    if prefix.is_empty() || prefix.len() > MAX_PREFIX_LEN || !is_plain_subject(prefix.as_bytes()) {
        return Err(Error::InvalidArgument(
            "a NATS subject prefix is 1 to 255 bytes of printable ASCII without %, * or >, and no empty token",
        ));
    }
    Ok(())
}

/// The NATS subject of `topic`, written into `out`.
#[cfg(feature = "nats")]
pub(crate) fn nats_subject(prefix: &[u8], topic: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(prefix);
    out.push(b'.');
    if is_plain_subject(topic) {
        out.extend_from_slice(topic);
    } else {
        for &byte in topic {
            if is_kept_when_escaping(byte) {
                out.push(byte);
            } else {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.extend_from_slice(&[
                    b'%',
                    HEX[usize::from(byte >> 4)],
                    HEX[usize::from(byte & 15)],
                ]);
            }
        }
    }
    if out.len() > MAX_SUBJECT_LEN {
        out.truncate(prefix.len() + 1);
        out.extend_from_slice(b"%SHA1.");
        for byte in Sha1::digest(topic) {
            out.extend_from_slice(format!("{byte:02x}").as_bytes());
        }
    }
}

/// Printable ASCII without `%`, `*`, `>`, and no empty `.`-separated token.
#[cfg(feature = "nats")]
fn is_plain_subject(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes
            .iter()
            .all(|&b| (0x21..=0x7e).contains(&b) && !matches!(b, b'%' | b'*' | b'>'))
        && bytes.split(|&b| b == b'.').all(|token| !token.is_empty())
}

#[cfg(feature = "nats")]
fn is_kept_when_escaping(byte: u8) -> bool {
    (0x21..=0x7e).contains(&byte) && !matches!(byte, b'%' | b'*' | b'>' | b'.')
}

/// The topic an escaped or plain subject suffix (after `prefix.`) names; `None` for a hashed
/// subject or a bad escape. For tests and tools: the engine maps subjects back by
/// subscription.
#[cfg(all(test, feature = "nats"))]
fn topic_of_subject(suffix: &[u8]) -> Option<Vec<u8>> {
    if suffix.starts_with(b"%SHA1.") {
        return None;
    }
    if !suffix.contains(&b'%') {
        return Some(suffix.to_vec());
    }
    let mut topic = Vec::with_capacity(suffix.len());
    let mut at = 0;
    while at < suffix.len() {
        if suffix[at] == b'%' {
            let hex = std::str::from_utf8(suffix.get(at + 1..at + 3)?).ok()?;
            topic.push(u8::from_str_radix(hex, 16).ok()?);
            at += 3;
        } else {
            topic.push(suffix[at]);
            at += 1;
        }
    }
    Some(topic)
}

#[cfg(all(test, feature = "nats"))]
mod tests {
    use super::*;

    fn subject(topic: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        nats_subject(b"app", topic, &mut out);
        out
    }

    #[test]
    fn plain_subjects_map_unchanged() {
        assert_eq!(subject(b"news"), b"app.news");
        assert_eq!(subject(b"orders.eu.42"), b"app.orders.eu.42");
        assert_eq!(subject(b"a-b_c~d:e/f"), b"app.a-b_c~d:e/f");
    }

    #[test]
    fn other_topics_are_escaped_into_one_token() {
        assert_eq!(subject(b"two words"), b"app.two%20words");
        assert_eq!(subject(b"a..b"), b"app.a%2E%2Eb");
        assert_eq!(subject(b"*"), b"app.%2A");
        assert_eq!(subject(b"x.>"), b"app.x%2E%3E");
        assert_eq!(subject(b"100%"), b"app.100%25");
        assert_eq!(subject("é".as_bytes()), b"app.%C3%A9");
        assert_eq!(subject(b".lead"), b"app.%2Elead");
        assert_eq!(subject(b"nul\0"), b"app.nul%00");
    }

    #[test]
    fn the_mapping_is_reversible_and_never_collides() {
        let topics: Vec<&[u8]> = vec![
            b"news",
            b"two words",
            b"a..b",
            b"*",
            b">",
            b"x.y",
            b"100%",
            b"100%25",
            b"%41",
            b"A",
            "日本".as_bytes(),
            b"\xff\x00",
            b"tab\there",
            b"a.b.",
            b"SHA1.x",
        ];
        let mut seen = std::collections::HashSet::new();
        for topic in topics {
            let subject = subject(topic);
            assert!(seen.insert(subject.clone()), "collision on {topic:?}");
            assert!(subject.iter().all(|&b| (0x21..=0x7e).contains(&b)));
            let suffix = &subject[4..];
            assert_eq!(topic_of_subject(suffix).as_deref(), Some(topic));
            assert!(suffix.split(|&b| b == b'.').all(|token| !token.is_empty()));
            assert!(suffix.split(|&b| b == b'.').all(|t| t != b"*" && t != b">"));
        }
    }

    #[test]
    fn long_topics_get_a_hashed_subject() {
        let long = vec![b'x'; 4096];
        let hashed = subject(&long);
        assert!(hashed.len() <= MAX_SUBJECT_LEN);
        assert!(hashed.starts_with(b"app.%SHA1."));
        assert_eq!(hashed.len(), b"app.%SHA1.".len() + 40);
        let mut other = long.clone();
        other[4095] = b'y';
        assert_ne!(subject(&other), hashed);
        let short = vec![b'x'; MAX_SUBJECT_LEN - 4];
        assert_eq!(subject(&short).len(), MAX_SUBJECT_LEN);
    }

    #[test]
    #[cfg(feature = "redis")]
    fn prefixes_are_checked() {
        assert!(check_nats_prefix("fdcast").is_ok());
        assert!(check_nats_prefix("a.b").is_ok());
        for bad in ["", "a..b", ".a", "a.", "a b", "a.*", ">", "a%b"] {
            assert!(check_nats_prefix(bad).is_err(), "{bad}");
        }
        assert!(check_redis_prefix("").is_ok());
        assert!(check_redis_prefix(&"x".repeat(256)).is_err());
    }
}
