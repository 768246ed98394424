//! WebSocket framing costs: parsing (unmasking, UTF-8 checking) a client's masked text frame,
//! and encoding a server text frame. The hot direction for a relay is server -> client, where
//! an event's frame is encoded once per event (see `encode.rs`) and never per subscriber; the
//! client -> server direction is paid once per publish or op over WebSocket.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use relay::ws::codec::{text_frame, FrameReader, Limits};

/// A client frame: FIN + text, masked with a fixed key.
fn masked_text(payload: &[u8]) -> Vec<u8> {
    let key = [0x12u8, 0x34, 0x56, 0x78];
    let mut frame = vec![0x81];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= u16::MAX as usize => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&key);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    frame
}

fn publish_op(data_len: usize) -> Vec<u8> {
    let data = "x".repeat(data_len);
    format!(r#"{{"op":"publish","ref":1,"channel":"doc.42","type":"document.edit","data":{{"p":"{data}"}}}}"#)
        .into_bytes()
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("ws_parse_client_frame");
    for (name, len) in [("publish_100B", 100), ("publish_4KiB", 4096)] {
        let frame = masked_text(&publish_op(len));
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_function(name, |b| {
            let mut reader = FrameReader::new(Limits {
                max_frame_bytes: 1 << 20,
                max_message_bytes: 1 << 20,
            });
            b.iter(|| black_box(reader.read(black_box(&frame)).ok()));
        });
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("ws_encode_server_frame");
    for (name, len) in [("reply_100B", 100), ("event_4KiB", 4096)] {
        let payload = publish_op(len);
        group.throughput(Throughput::Bytes(payload.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| black_box(text_frame(black_box(&payload))))
        });
    }
    group.finish();
}

criterion_group!(benches, parse, encode);
criterion_main!(benches);
