//! `EventId::parse` on arbitrary bytes (what a client sends as `Last-Event-ID`).
//! Properties: never panics; an id that parses has exactly the spelling it was parsed from
//! (one spelling per id); and, read as two numbers, the input's first 16 bytes make an id
//! whose text form parses back to it.
#![no_main]

use fdcast::EventId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(id) = EventId::parse(data) {
        assert_eq!(id.to_string().as_bytes(), data);
    }
    if let (Some(epoch), Some(offset)) = (data.get(..8), data.get(8..16)) {
        let id = EventId {
            epoch: u64::from_le_bytes(epoch.try_into().unwrap()),
            offset: u64::from_le_bytes(offset.try_into().unwrap()),
        };
        assert_eq!(EventId::parse(id.to_string().as_bytes()), Some(id));
    }
});
