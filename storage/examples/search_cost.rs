//! What search costs the embedded store: append throughput of word-like texts over many rooms
//! (the writes that keep a search index up to date), then search latency in one large room.
//!
//! ```text
//! cargo run --release -p storage --no-default-features --features sqlite --example search_cost -- \
//!     [--messages 300000] [--rooms 2000] [--inflight 768] [--warmup 20000] \
//!     [--big 200000] [--repeat 20] [--dir PATH]
//! ```
//!
//! It uses the public `Store` API only, so the same file measures any build of the crate (with
//! and without an index, say). Texts are about 100 bytes of words drawn with a skewed frequency
//! from a vocabulary of 5,000 made-up words (deterministic, no `z` in any of them).
//!
//! 1. Appends: `--messages` round-robin over `--rooms` rooms, `--inflight` at once, as
//!    `many_rooms` does. Reports durable messages/s after `--warmup` and the bytes passed to
//!    write syscalls per message (`wchar` of /proc/self/io: the log plus checkpoints).
//! 2. Searches in a room of `--big` messages in which "zebra" occurs twice (seq 5 and
//!    `big` − 5,000): each query asks for a page of 50 hits, following continuation cursors until
//!    it has them or there are no more, `--repeat` times; reports the requests that took, the
//!    median and the slowest total time and the slowest single request.
//! 3. The database's size at the end, both parts together.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use storage::{AnyStore, NewMessage, NewRoom, RoomKey, SearchQuery, Store};

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.replace('_', "").parse().expect(name))
}

fn wchar() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// xorshift64*: deterministic texts without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// In `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const SYLLABLES: [&str; 16] = [
    "ka", "lo", "mi", "ne", "to", "ra", "su", "pe", "vi", "do", "ga", "fu", "ho", "be", "ti", "wa",
];

fn vocabulary(size: usize) -> Vec<String> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut words: Vec<String> = Vec::with_capacity(size);
    while words.len() < size {
        let syllables = 1 + (rng.next() % 4) as usize;
        let word: String = (0..syllables)
            .map(|_| SYLLABLES[(rng.next() % 16) as usize])
            .collect();
        if !words.contains(&word) {
            words.push(word);
        }
    }
    words
}

/// About 100 bytes of words; low indexes are far more frequent than high ones.
fn text(rng: &mut Rng, vocabulary: &[String]) -> String {
    let mut out = String::with_capacity(110);
    while out.len() < 95 {
        let index = (vocabulary.len() as f64 * rng.unit().powf(3.0)) as usize;
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&vocabulary[index.min(vocabulary.len() - 1)]);
    }
    out
}

/// Appends `total` messages round-robin over `keys`, `inflight` at once; returns messages/s and
/// write syscall bytes per message after `warmup`.
async fn append_all(
    store: &AnyStore,
    keys: &[RoomKey],
    total: usize,
    warmup: usize,
    inflight: usize,
    vocabulary: &Arc<Vec<String>>,
) -> (f64, f64) {
    let keys = Arc::new(keys.to_vec());
    let seqs: Arc<Vec<AtomicU64>> = Arc::new((0..keys.len()).map(|_| AtomicU64::new(0)).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mark = Arc::new(std::sync::Mutex::new((Instant::now(), wchar())));
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..inflight {
        let (store, keys, seqs, next, done, mark, vocabulary) = (
            store.clone(),
            Arc::clone(&keys),
            Arc::clone(&seqs),
            Arc::clone(&next),
            Arc::clone(&done),
            Arc::clone(&mark),
            Arc::clone(vocabulary),
        );
        tasks.spawn(async move {
            let mut rng = Rng(0x1234_5678 + task as u64);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return;
                }
                let room = i % keys.len();
                let seq = seqs[room].fetch_add(1, Ordering::Relaxed) + 1;
                // The big room's rare word.
                let body = if keys.len() == 1 && (seq == 5 || seq as usize + 5_000 == total) {
                    "a zebra passes by".to_owned()
                } else {
                    text(&mut rng, &vocabulary)
                };
                // Numbered and queued without an await in between, so each room's appends reach
                // the writer in seq order.
                let message = NewMessage::text(&keys[room], seq, "sender", &body);
                let appended = store.append(message).await.expect("append");
                assert!(!appended.duplicate);
                if done.fetch_add(1, Ordering::Relaxed) + 1 == warmup {
                    *mark.lock().unwrap() = (Instant::now(), wchar());
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let (t0, w0) = *mark.lock().unwrap();
    let measured = (total - warmup).max(1) as f64;
    (
        measured / t0.elapsed().as_secs_f64(),
        (wchar() - w0) as f64 / measured,
    )
}

/// Gets one page's worth of hits (`limit` 50) or all there are, following the continuation
/// cursors of a search that stopped at its budget; returns the requests that took, the total
/// time and the slowest request.
async fn first_page(store: &AnyStore, room: &RoomKey, words: &str) -> (u32, Duration, Duration) {
    let mut query = SearchQuery {
        words: words.to_owned(),
        limit: 50,
        include_notes: true,
        ..SearchQuery::default()
    };
    let (mut requests, mut found, mut slowest) = (0, 0, Duration::ZERO);
    let started = Instant::now();
    loop {
        let one = Instant::now();
        let page = store.search(room, query.clone()).await.expect("search");
        slowest = slowest.max(one.elapsed());
        requests += 1;
        found += page.messages.len();
        match page.next_before_seq {
            Some(before) if found < 50 => query.before_seq = Some(before),
            _ => break,
        }
    }
    (requests, started.elapsed(), slowest)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let total = arg(&args, "--messages", 300_000);
    let warmup = arg(&args, "--warmup", 20_000).min(total);
    let rooms = arg(&args, "--rooms", 2_000);
    let inflight = arg(&args, "--inflight", 768);
    let big = arg(&args, "--big", 200_000);
    let repeat = arg(&args, "--repeat", 20).max(1);
    let dir = args
        .iter()
        .position(|a| a == "--dir")
        .and_then(|i| args.get(i + 1))
        .map_or_else(std::env::temp_dir, std::path::PathBuf::from);
    let tmp = tempfile::tempdir_in(&dir).unwrap();
    let path = tmp.path().join("chat.db");
    let store = storage::open(&format!("sqlite://{}", path.display())).unwrap();
    let vocabulary = Arc::new(vocabulary(5_000));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let keys: Vec<RoomKey> = (0..rooms)
            .map(|i| RoomKey::new("loadgen", &format!("lg-01jb2x7k9q-h{i}")))
            .collect();
        for key in &keys {
            let room = NewRoom::team(&key.room_id, &key.tenant_id, "sender");
            store.create_room(room).await.unwrap();
        }
        let (per_s, bytes) = append_all(&store, &keys, total, warmup, inflight, &vocabulary).await;
        println!(
            "APPEND messages={total} rooms={rooms} inflight={inflight} msgs_per_s={per_s:.0} \
             write_syscall_bytes_per_msg={bytes:.0}"
        );

        let room = RoomKey::new("loadgen", "big");
        store
            .create_room(NewRoom::team(&room.room_id, &room.tenant_id, "sender"))
            .await
            .unwrap();
        let started = Instant::now();
        append_all(
            &store,
            std::slice::from_ref(&room),
            big,
            0,
            inflight,
            &vocabulary,
        )
        .await;
        println!(
            "BIG room messages={big} filled_in_s={:.2}",
            started.elapsed().as_secs_f64()
        );
        let common = vocabulary[0].clone();
        let pair = format!("{} {}", vocabulary[0], vocabulary[1]);
        let uncommon = vocabulary[2_000].clone();
        for (name, words) in [
            ("rare(2 hits)", "zebra".to_owned()),
            ("absent", "quokka".to_owned()),
            ("common", common),
            ("two_common", pair),
            ("uncommon", uncommon),
        ] {
            let mut totals = Vec::with_capacity(repeat);
            let (mut requests, mut slowest) = (0, Duration::ZERO);
            for _ in 0..repeat {
                let (n, took, worst) = first_page(&store, &room, &words).await;
                totals.push(took);
                requests = n;
                slowest = slowest.max(worst);
            }
            totals.sort_unstable();
            println!(
                "SEARCH {name:<13} words={words:?} requests={requests} median_ms={:.2} \
                 max_ms={:.2} slowest_request_ms={:.2}",
                totals[totals.len() / 2].as_secs_f64() * 1e3,
                totals[totals.len() - 1].as_secs_f64() * 1e3,
                slowest.as_secs_f64() * 1e3,
            );
        }
        store.close().await.unwrap();
    });
    // Closing checkpointed the log into the database file.
    println!(
        "db_bytes={}",
        std::fs::metadata(&path).map_or(0, |m| m.len())
    );
}
