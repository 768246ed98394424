//! The publish envelope's fast path, `relay::envelope::{scan_one, scan_batch,
//! scan_ws_publish}`, on arbitrary UTF-8 (a publish body, or a WebSocket text message; other
//! input is skipped, as the callers refuse non-UTF-8 before scanning), plus
//! `relay::api::parse_drafts` on the raw bytes (the whole publish-body parser, fast and slow
//! paths) and `first_string_stop` against a byte-at-a-time model.
//!
//! Asserts what the module header promises: the fast path never accepts what `serde_json`
//! refuses, and reads every field as `serde_json` does. `serde_json` reads the text into the
//! crate's own serde types (`api::DraftIn` and `ws::protocol::Request`), as the differential
//! unit tests in src/api.rs and src/ws/protocol.rs do. Also: every field returned is a slice of the text,
//! `data` is exactly a JSON value without surrounding whitespace, a batch is never empty, and a
//! WebSocket publish has `op` "publish", no `since`, and a `data` other than `null`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::api::DraftIn;
use relay::envelope::{self, Fields};
use relay::ws::protocol::Request as WsRequest;
use serde_json::value::RawValue;

/// `part` lies inside `text` (the fast path hands out slices, never copies).
fn within(text: &str, part: &str) -> bool {
    let range = text.as_bytes().as_ptr_range();
    let start = part.as_ptr();
    range.contains(&start) && start as usize + part.len() <= range.end as usize
        || (part.is_empty() && start == range.end)
}

fn check_fields(text: &str, f: &Fields<'_>) {
    for part in [
        Some(f.channel),
        Some(f.event_type),
        Some(f.data),
        f.id,
        f.source,
        f.correlation_id,
    ]
    .into_iter()
    .flatten()
    {
        assert!(within(text, part), "{part:?} is not a slice of the text");
    }
    // `data` is one JSON value, exactly, without the whitespace around it.
    let raw: &RawValue = serde_json::from_str(f.data).expect("data is JSON");
    assert_eq!(raw.get(), f.data);
    assert_eq!(f.data.trim(), f.data);
}

fuzz_target!(|bytes: &[u8]| {
    // The whole body parser first: any bytes, never a panic.
    let _ = relay::api::parse_drafts(&bytes::Bytes::copy_from_slice(bytes));

    // `first_string_stop` against the obvious model, from a few starting points.
    for from in [0, 1, 7, 8, bytes.len() / 2, bytes.len()] {
        let model = bytes
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, &b)| b == b'"' || b == b'\\' || b < 0x20)
            .map(|(i, _)| i);
        assert_eq!(
            envelope::first_string_stop(bytes, from),
            model,
            "from {from}"
        );
    }

    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };

    if let Some(fast) = envelope::scan_one(text) {
        check_fields(text, &fast);
        match serde_json::from_str::<DraftIn>(text) {
            Ok(slow) => assert_eq!(fast, slow.fields(), "scan_one reads differently from serde"),
            Err(e) => panic!("scan_one read what serde_json refuses ({e})"),
        }
    }

    if let Some(fast) = envelope::scan_batch(text) {
        assert!(
            !fast.is_empty(),
            "an empty batch is the slow path's to refuse"
        );
        for f in &fast {
            check_fields(text, f);
        }
        match serde_json::from_str::<Vec<DraftIn>>(text) {
            Ok(slow) => {
                let slow: Vec<Fields> = slow.iter().map(DraftIn::fields).collect();
                assert_eq!(fast, slow, "scan_batch reads differently from serde");
            }
            Err(e) => panic!("scan_batch read what serde_json refuses ({e})"),
        }
    }

    if let Some(fast) = envelope::scan_ws_publish(text) {
        check_fields(text, &fast.fields);
        assert_ne!(fast.fields.data, "null");
        if let Some(reference) = fast.reference {
            assert!(within(text, reference));
            let raw: &RawValue = serde_json::from_str(reference).expect("ref is JSON");
            assert_eq!(raw.get(), reference);
        }
        match serde_json::from_str::<WsRequest>(text) {
            Ok(slow) => {
                assert_eq!(&*slow.op, "publish");
                assert!(slow.since.is_none());
                assert_eq!(fast.reference, slow.reference.map(RawValue::get));
                let f = fast.fields;
                assert_eq!(Some(f.channel), slow.channel.as_deref());
                assert_eq!(Some(f.event_type), slow.event_type.as_deref());
                assert_eq!(Some(f.data), slow.data.map(RawValue::get));
                assert_eq!(f.id, slow.id.as_deref());
                assert_eq!(f.source, slow.source.as_deref());
                assert_eq!(f.correlation_id, slow.correlation_id.as_deref());
            }
            Err(e) => panic!("scan_ws_publish read what serde_json refuses ({e})"),
        }
    }
});
