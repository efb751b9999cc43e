//! Fan-out: one encoded `chat_response` frame, shared as `Bytes`, pushed to N connection
//! outboxes (what a room shard does for every stored message).
//!
//! The writers are simulated: every [`ROUNDS_PER_DRAIN`] fan-outs the queues are drained outside
//! the timed section, so they hold 0 to 63 frames while timed and never reach the bound.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bench::{chat_message, drain, outbox_metrics, outboxes, OUTBOUND_QUEUE, ROOM, USER};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gateway::cmd::Code;
use gateway::codec::FrameBuilder;
use gateway::outbox::{FrameClass, Frames, Pushed};

/// Fan-outs timed back to back before the queues are drained.
const ROUNDS_PER_DRAIN: u64 = 64;

fn fanout(c: &mut Criterion) {
    const _: () = assert!((ROUNDS_PER_DRAIN as usize) < OUTBOUND_QUEUE);
    let frame = FrameBuilder::success(
        Code::Chat.response(),
        USER,
        Some(ROOM),
        None,
        chat_message(),
    );
    let metrics = outbox_metrics();
    let mut group = c.benchmark_group("fanout");
    for n in [10usize, 100, 1000] {
        let boxes = outboxes(n, &metrics);
        let mut batch = Frames::with_capacity(n * ROUNDS_PER_DRAIN as usize);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &boxes, |b, boxes| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let rounds = left.min(ROUNDS_PER_DRAIN);
                    let start = Instant::now();
                    for _ in 0..rounds {
                        for outbox in boxes {
                            let pushed = outbox.push(frame.clone(), FrameClass::Durable);
                            debug_assert_eq!(pushed, Pushed::Queued);
                            black_box(pushed);
                        }
                    }
                    elapsed += start.elapsed();
                    for outbox in boxes {
                        drain(outbox, &mut batch);
                    }
                    batch.clear();
                    left -= rounds;
                }
                elapsed
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = fanout
}
criterion_main!(benches);
