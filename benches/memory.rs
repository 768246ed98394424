//! This machine's memory latency, the ceiling under relay's own per-event work: one dependent
//! load at a time (each load's address comes from the one before), over a working set from
//! 256 KiB to 64 MiB, every cache line visited once per cycle in a shuffled order so that no
//! prefetcher can guess the next one.
//!
//! Nothing of relay is measured here. It answers one question for the performance report:
//! what it costs to reach state that is not in the core's caches. The time per load steps up
//! where the working set leaves each cache level; past the last level, every load is a trip to
//! DRAM. relay's hot paths touch a few dozen such lines per event (a connection's state, a
//! channel's entry, a history slot, the kernel's socket), so this figure times a few dozen is
//! the floor of their cost once the load spreads over more state than the caches hold.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

#[path = "common/shuffle.rs"]
mod shuffle;

/// One cache line; the first word holds the index of the next line to visit.
#[repr(align(64))]
#[derive(Clone, Copy)]
struct Line([usize; 8]);

/// A single cycle through every line of `bytes` of memory, in a fixed shuffled order.
fn chain(bytes: usize) -> Vec<Line> {
    let lines = bytes / std::mem::size_of::<Line>();
    let order = shuffle::shuffled(lines);
    let mut memory = vec![Line([0; 8]); lines];
    for (at, &line) in order.iter().enumerate() {
        memory[line].0[0] = order[(at + 1) % lines];
    }
    memory
}

fn bench_memory(c: &mut Criterion) {
    let mut group = c.benchmark_group("dependent_load");
    group.throughput(Throughput::Elements(1));
    for kib in [256usize, 1024, 2048, 3072, 4096, 8192, 16384, 65536] {
        let memory = chain(kib * 1024);
        let mut at = 0usize;
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{kib}KiB")),
            &kib,
            |b, _| {
                b.iter(|| {
                    at = memory[black_box(at)].0[0];
                    at
                })
            },
        );
        // The chain is one cycle: walking as many steps as it has lines comes back to the start.
        let mut walk = 0usize;
        for _ in 0..memory.len() {
            walk = memory[walk].0[0];
        }
        assert_eq!(
            walk, 0,
            "the shuffled chain visits every line once per cycle"
        );
    }
    group.finish();
}

criterion_group!(benches, bench_memory);
criterion_main!(benches);
