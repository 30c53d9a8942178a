//! The notification format shared with Tep::Broadcast workers on a PostgreSQL channel:
//! `<decimal byte length of topic>:<topic><payload>`, the length in ASCII digits. Pure
//! functions, so the format is tested without a server.

#![forbid(unsafe_code)]

use std::ops::Range;

use crate::error::Error;
use crate::registry::MAX_TOPIC_LEN;

/// PostgreSQL refuses NOTIFY payloads of 8000 bytes or more.
pub(crate) const MAX_NOTIFY_PAYLOAD: usize = 7999;

/// Refuses what NOTIFY cannot carry: NUL bytes and invalid UTF-8 anywhere (`EILSEQ`), and a
/// notification that is too long (`EMSGSIZE`).
pub(crate) fn check(topic: &[u8], payload: &[u8]) -> Result<(), Error> {
    encoded_len(topic, payload)?;
    text_without_nul(topic)?;
    text_without_nul(payload)?;
    Ok(())
}

fn encoded_len(topic: &[u8], payload: &[u8]) -> Result<usize, Error> {
    let digits = topic.len().checked_ilog10().unwrap_or(0) as usize + 1;
    let total = digits + 1 + topic.len() + payload.len();
    if total > MAX_NOTIFY_PAYLOAD {
        return Err(Error::TooLarge);
    }
    Ok(total)
}

/// Builds the notification for a publish, refusing what [`check`] refuses.
pub(crate) fn encode(topic: &[u8], payload: &[u8]) -> Result<String, Error> {
    let total = encoded_len(topic, payload)?;
    let prefix = topic.len().to_string();
    let topic = text_without_nul(topic)?;
    let payload = text_without_nul(payload)?;
    let mut notification = String::with_capacity(total);
    notification.push_str(&prefix);
    notification.push(':');
    notification.push_str(topic);
    notification.push_str(payload);
    Ok(notification)
}

fn text_without_nul(bytes: &[u8]) -> Result<&str, Error> {
    if bytes.contains(&0) {
        return Err(Error::NotText(
            "NUL bytes cannot travel in a PostgreSQL notification",
        ));
    }
    std::str::from_utf8(bytes)
        .map_err(|_| Error::NotText("a PostgreSQL notification must be valid UTF-8"))
}

/// Where a notification's topic and payload are; `None` if it is not in the format.
pub(crate) fn decode_ranges(notification: &[u8]) -> Option<(Range<usize>, Range<usize>)> {
    let (topic, payload) = decode(notification)?;
    let topic_start = notification.len() - payload.len() - topic.len();
    Some((
        topic_start..topic_start + topic.len(),
        topic_start + topic.len()..notification.len(),
    ))
}

/// Splits a notification into topic and payload; `None` if it is not in the format.
pub(crate) fn decode(notification: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = notification.iter().position(|&b| b == b':')?;
    let digits = &notification[..colon];
    if digits.is_empty() || digits.len() > 4 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let topic_len: usize = std::str::from_utf8(digits).ok()?.parse().ok()?;
    if topic_len == 0 || topic_len > MAX_TOPIC_LEN {
        return None;
    }
    let rest = &notification[colon + 1..];
    if rest.len() < topic_len {
        return None;
    }
    Some(rest.split_at(topic_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_topic_length_in_bytes() {
        assert_eq!(encode(b"news", b"hello").unwrap(), "4:newshello");
        assert_eq!(encode("é".as_bytes(), b"").unwrap(), "2:é");
        assert_eq!(encode(b"a:1", b":x").unwrap(), "3:a:1:x");
    }

    #[test]
    fn round_trips_awkward_topics() {
        for topic in ["12:34", "quote'\"", "line\nbreak", "日本語", "9"] {
            let wire = encode(topic.as_bytes(), b"payload:42").unwrap();
            assert_eq!(
                decode(wire.as_bytes()),
                Some((topic.as_bytes(), &b"payload:42"[..]))
            );
        }
    }

    #[test]
    fn refuses_what_notify_cannot_carry() {
        assert_eq!(encode(b"t", b"a\0b").unwrap_err().errno(), libc::EILSEQ);
        assert_eq!(encode(b"t\0", b"").unwrap_err().errno(), libc::EILSEQ);
        assert_eq!(encode(b"t", b"\xff").unwrap_err().errno(), libc::EILSEQ);
        assert_eq!(encode(b"\xc3", b"").unwrap_err().errno(), libc::EILSEQ);
        let fits = vec![b'x'; MAX_NOTIFY_PAYLOAD - 3];
        assert_eq!(encode(b"t", &fits).unwrap().len(), MAX_NOTIFY_PAYLOAD);
        let too_long = vec![b'x'; MAX_NOTIFY_PAYLOAD - 2];
        assert_eq!(encode(b"t", &too_long).unwrap_err().errno(), libc::EMSGSIZE);
        assert_eq!(check(b"t", &too_long).unwrap_err().errno(), libc::EMSGSIZE);
        assert!(check(b"t", &fits).is_ok());
        let ten = [b'x'; 10];
        let fits_ten = vec![b'x'; MAX_NOTIFY_PAYLOAD - 13];
        assert!(check(&ten, &fits_ten).is_ok());
        assert!(check(&ten, &[fits_ten.as_slice(), b"x"].concat()).is_err());
        assert_eq!(check(b"t", b"\xff").unwrap_err().errno(), libc::EILSEQ);
    }

    #[test]
    fn rejects_malformed_notifications() {
        for bad in [
            &b""[..],
            b"hello",
            b":topic",
            b"x:topic",
            b"-1:t",
            b"0:",
            b"5:abc",
            b"99999:t",
            b"+3:abc",
            b" 3:abc",
        ] {
            assert_eq!(decode(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(decode(b"3:abc"), Some((&b"abc"[..], &b""[..])));
        assert_eq!(decode(b"03:abcd"), Some((&b"abc"[..], &b"d"[..])));
        assert_eq!(decode_ranges(b"03:abcd"), Some((3..6, 6..7)));
    }
}
