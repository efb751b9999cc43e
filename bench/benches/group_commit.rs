//! Durable appends through the SQLite backend's group-commit writer (WAL, `synchronous=FULL`),
//! in a temporary directory: each iteration fires B concurrent appends to one room, with the
//! writer's `max_batch` set to B, and waits until all of them are durable.

use std::time::{Duration, Instant};

use bench::{text, MESSAGE_TEXT_LEN, ROOM, TENANT, USER};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_util::future::join_all;
use storage::{NewMessage, NewRoom, RoomKey, Store};

fn group_commit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let body = text(MESSAGE_TEXT_LEN);
    let room = RoomKey::new(TENANT, ROOM);
    let mut group = c.benchmark_group("group_commit");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for batch in [1usize, 64, 1024] {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!(
            "sqlite://{}?max_batch={batch}",
            dir.path().join("bench.db").display()
        );
        let store = storage::open(&url).expect("open store");
        // The bench is the room's owner: it numbers the messages.
        let mut next_seq = 1u64;
        runtime
            .block_on(store.create_room(NewRoom::team(ROOM, TENANT, USER)))
            .expect("create room");
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let mut elapsed = Duration::ZERO;
                    for _ in 0..iters {
                        let messages: Vec<NewMessage> = (0..batch)
                            .map(|_| {
                                next_seq += 1;
                                NewMessage::text(&room, next_seq - 1, USER, &body)
                            })
                            .collect();
                        let start = Instant::now();
                        let results = join_all(messages.into_iter().map(|m| store.append(m))).await;
                        elapsed += start.elapsed();
                        for result in results {
                            assert!(!result.expect("append").duplicate);
                        }
                    }
                    elapsed
                })
            })
        });
        runtime.block_on(store.close()).expect("close store");
    }
    group.finish();
}

criterion_group!(benches, group_commit);
criterion_main!(benches);
