//! The protocol codec on its own: parsing a client chat frame (envelope, then the `chat`
//! command's `data`) and serializing the `chat_response` frame that carries the stored message.

use std::hint::black_box;
use std::time::Duration;

use bench::{chat_frame, chat_message, CHAT_FRAME_LEN, REFERENCE, ROOM, USER};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gateway::cmd::{Code, Command};
use gateway::codec::{parse_envelope, FrameBuilder};

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope_parse");
    for len in [CHAT_FRAME_LEN, 1000] {
        let frame = chat_frame(len);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::new("envelope", len), &frame, |b, frame| {
            b.iter(|| {
                parse_envelope(black_box(frame))
                    .expect("valid envelope")
                    .data
            })
        });
        group.bench_with_input(
            BenchmarkId::new("envelope+command", len),
            &frame,
            |b, frame| {
                b.iter(|| {
                    let envelope = parse_envelope(black_box(frame)).expect("valid envelope");
                    let code = Code::parse(&envelope.code).expect("known code");
                    Command::parse(code, envelope.data, &envelope.user_id).expect("valid chat")
                })
            },
        );
    }
    group.finish();
}

fn serialize(c: &mut Criterion) {
    let message = chat_message();
    let encode = |message| {
        FrameBuilder::success(
            Code::Chat.response(),
            black_box(USER),
            Some(ROOM),
            Some(REFERENCE),
            message,
        )
    };
    let mut group = c.benchmark_group("frame_serialize");
    group.throughput(Throughput::Bytes(encode(&message).len() as u64));
    group.bench_function("chat_response", |b| b.iter(|| encode(black_box(&message))));
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = parse, serialize
}
criterion_main!(benches);
