//! The generator's per-event work on what relay sends: finding an event's channel, seq and
//! scheduled time in a WebSocket frame payload. In the fan-out scenario the generator runs
//! this millions of times a second on one core, so its cost decides whether the generator or
//! relay saturates first.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use relay_loadgen::{payload, scan};

/// A WebSocket event payload as relay writes it, with the generator's 100-byte `data`.
fn relay_event() -> Vec<u8> {
    let mut e = Vec::new();
    e.extend_from_slice(scan::WS_EVENT_PREFIX);
    e.extend_from_slice(
        br#""id":"0193f1d2-7a6b-7c3d-8e9f-0123456789ab","channel":"fanout.0","type":"lg","seq":1234567,"epoch":"k3x9","ts":1763812345123,"data":"#,
    );
    // A scheduled time as the generator writes it: nanoseconds since its origin.
    payload::write_data(&mut e, 35_912_345_678_901, 100);
    e.push(b'}');
    e
}

fn bench(c: &mut Criterion) {
    let event = relay_event();
    assert!(scan::scan_event(&event).is_some());
    let mut g = c.benchmark_group("scan");
    g.throughput(Throughput::Elements(1));
    g.bench_function("relay_ws_event", |b| {
        b.iter(|| scan::scan_event(black_box(&event)))
    });
    g.bench_function("ws_op", |b| b.iter(|| scan::ws_op(black_box(&event))));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
