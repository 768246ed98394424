//! Publish-side encoding: `Event::encode` (the envelope JSON, the SSE block and the WebSocket
//! frame, built together once per event) for a 100-byte and a 4 KiB `data` payload, and
//! `parse_drafts` for a single-event publish body and a batch of 100 events.
//!
//! Both run on the owner shard for every accepted event, before any subscriber sees it: their
//! per-event cost is the ceiling on how many publishes one core can sequence, independent of
//! the number of subscribers (which only share the encoded bytes). Throughput is in events.

use std::hint::black_box;
use std::time::Instant;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use relay::api::parse_drafts;
use relay::bus::event::{Draft, Epoch, Event};

/// A JSON object of exactly `len` bytes, shaped like a document edit.
fn payload(len: usize) -> String {
    let head = r#"{"op":"insert","pos":1234,"author":"u-81","text":""#;
    let tail = r#""}"#;
    let fill = len
        .checked_sub(head.len() + tail.len())
        .expect("payload too short for the template");
    let text: String = "lorem ipsum dolor sit amet "
        .chars()
        .cycle()
        .take(fill)
        .collect();
    let json = format!("{head}{text}{tail}");
    assert_eq!(json.len(), len);
    json
}

fn draft(data: &str) -> Draft {
    Draft {
        channel: "doc.42".into(),
        event_type: "document.edit".into(),
        id: None,
        data: Bytes::copy_from_slice(data.as_bytes()),
        source: Some("editor-svc".into()),
        correlation_id: None,
    }
}

/// One publish body element around a payload, as a publisher would send it.
fn envelope_in(i: usize, data: &str) -> String {
    format!(r#"{{"channel":"doc.{i}","type":"document.edit","data":{data},"source":"editor-svc"}}"#)
}

fn bench_encode(c: &mut Criterion) {
    let epoch = Epoch::new("k3x9AbCd").expect("a valid epoch");
    let accepted_at = Instant::now();
    let id = "0190f5a2-7c3e-7b4d-9a1f-2e6c8d4b0a17";

    let mut group = c.benchmark_group("event_encode");
    group.throughput(Throughput::Elements(1));
    for (name, len) in [("data_100B", 100), ("data_4KiB", 4096)] {
        let draft = draft(&payload(len));
        let sample = Event::encode(&draft, epoch, 1, id, 1_742_000_000_000, accepted_at);
        assert!(sample.sse_len() > len && sample.ws_frame().len() > len);
        let mut seq = 0u64;
        group.bench_function(name, |b| {
            // Dropping the event stays outside the timed part so only the encoding is measured.
            b.iter_batched(
                || (),
                |()| {
                    seq += 1;
                    Event::encode(
                        black_box(&draft),
                        epoch,
                        seq,
                        id,
                        1_742_000_000_000,
                        accepted_at,
                    )
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn bench_parse_drafts(c: &mut Criterion) {
    let data = payload(100);
    let single = Bytes::from(envelope_in(0, &data));
    let batch = {
        let items: Vec<String> = (0..100).map(|i| envelope_in(i, &data)).collect();
        Bytes::from(format!("[{}]", items.join(",")))
    };

    let mut group = c.benchmark_group("parse_drafts");
    for (name, body, n) in [
        ("single_100B", &single, 1u64),
        ("batch_100x100B", &batch, 100),
    ] {
        let drafts = parse_drafts(body).expect("valid publish body");
        assert_eq!(drafts.len() as u64, n);
        assert_eq!(&drafts[0].data[..], data.as_bytes());
        group.throughput(Throughput::Elements(n));
        group.bench_function(name, |b| b.iter(|| parse_drafts(black_box(body))));
    }
    group.finish();
}

criterion_group!(benches, bench_encode, bench_parse_drafts);
criterion_main!(benches);
