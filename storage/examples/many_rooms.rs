//! Append throughput of the embedded store with many small messages spread over many rooms
//! (the chat-heavy shape: 2,000 rooms, 100-byte texts, round-robin, many appends in flight).
//!
//! ```text
//! cargo run --release -p storage --example many_rooms -- \
//!     [--messages 300000] [--rooms 2000] [--inflight 768] [--warmup 20000] [--dir PATH]
//! ```
//!
//! Each room's messages are numbered by a per-room counter, as a room's owner does. Reports,
//! over the measured part (after `--warmup` messages): messages/s, the mean batch size (from
//! the store's `gateway_store_batch_size` histogram), the WAL bytes written per message (frames
//! × (page size + 24), the log's frame count read from the `-shm` header after every commit;
//! a shorter log than before means it started over) and the bytes this process passed to write
//! syscalls per message (`wchar` of /proc/self/io: the log plus checkpoint writes).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use storage::{AnyStore, NewMessage, NewRoom, RoomKey, Store};

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

/// `(page size, frames in the log, salt)` from the wal-index header (native byte order); the
/// salt changes whenever the log starts over.
fn wal_header(shm: &Path) -> Option<(u64, u64, u32)> {
    let mut bytes = [0u8; 40];
    std::io::Read::read_exact(&mut std::fs::File::open(shm).ok()?, &mut bytes).ok()?;
    let word =
        |at: usize| u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let page = u16::from_ne_bytes([bytes[14], bytes[15]]);
    // A page size of 65536 is stored as 1.
    let page = if page == 1 { 65_536 } else { u64::from(page) };
    Some((page, u64::from(word(16)), word(32)))
}

/// Adds up the frames the log grew by, polling its header every half millisecond.
fn count_frames(shm: PathBuf, total: Arc<AtomicU64>, page: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    let (mut last, mut last_salt) = (0, 0);
    while !stop.load(Ordering::Relaxed) {
        if let Some((size, frames, salt)) = wal_header(&shm) {
            page.store(size, Ordering::Relaxed);
            let added = if salt == last_salt && frames >= last {
                frames - last
            } else {
                frames
            };
            total.fetch_add(added, Ordering::Relaxed);
            (last, last_salt) = (frames, salt);
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// `(count, sum)` of the store's batch-size histogram.
fn batches(store: &AnyStore) -> (u64, f64) {
    store
        .collectors()
        .iter()
        .flat_map(|c| c.collect())
        .filter(|family| family.name() == "gateway_store_batch_size")
        .flat_map(|family| family.get_metric().to_vec())
        .map(|m| {
            let h = m.get_histogram();
            (h.get_sample_count(), h.get_sample_sum())
        })
        .next()
        .unwrap_or((0, 0.0))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let total = arg(&args, "--messages", 300_000);
    let warmup = arg(&args, "--warmup", 20_000).min(total);
    let rooms = arg(&args, "--rooms", 2_000);
    let inflight = arg(&args, "--inflight", 768);
    let dir = args
        .iter()
        .position(|a| a == "--dir")
        .and_then(|i| args.get(i + 1))
        .map_or_else(std::env::temp_dir, PathBuf::from);
    let tmp = tempfile::tempdir_in(&dir).unwrap();
    let path = tmp.path().join("chat.db");
    let store = storage::open(&format!("sqlite://{}", path.display())).unwrap();

    let frames = Arc::new(AtomicU64::new(0));
    let page = Arc::new(AtomicU64::new(4096));
    let stop = Arc::new(AtomicBool::new(false));
    let counter = {
        let (shm, frames, page, stop) = (
            path.with_extension("db-shm"),
            Arc::clone(&frames),
            Arc::clone(&page),
            Arc::clone(&stop),
        );
        std::thread::spawn(move || count_frames(shm, frames, page, stop))
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let keys: Arc<Vec<RoomKey>> = Arc::new(
            (0..rooms)
                .map(|i| RoomKey::new("loadgen", &format!("lg-01jb2x7k9q-h{i}")))
                .collect(),
        );
        for (i, key) in keys.iter().enumerate() {
            let room = NewRoom::team(&key.room_id, &key.tenant_id, &format!("h{i}-0"));
            store.create_room(room).await.unwrap();
        }
        let seqs: Arc<Vec<AtomicU64>> = Arc::new((0..rooms).map(|_| AtomicU64::new(0)).collect());
        let text: String = "t=1700000000000000000 "
            .chars()
            .chain(std::iter::repeat('x'))
            .take(100)
            .collect();
        let next = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        // (when, batches, messages in batches, log frames, write syscall bytes)
        let mark = Arc::new(std::sync::Mutex::new(None));
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..inflight {
            let (store, keys, seqs, next, done, text, mark, frames) = (
                store.clone(),
                Arc::clone(&keys),
                Arc::clone(&seqs),
                Arc::clone(&next),
                Arc::clone(&done),
                text.clone(),
                Arc::clone(&mark),
                Arc::clone(&frames),
            );
            tasks.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return;
                    }
                    let room = i % keys.len();
                    let sender = format!("h{room}-{}", (i / keys.len()) % 3);
                    // Numbered and queued without an await in between (`append` queues when
                    // called), so each room's appends reach the writer in seq order.
                    let seq = seqs[room].fetch_add(1, Ordering::Relaxed) + 1;
                    let message = NewMessage::text(&keys[room], seq, &sender, &text);
                    let appended = store.append(message).await.expect("append");
                    assert!(!appended.duplicate);
                    if done.fetch_add(1, Ordering::Relaxed) + 1 == warmup {
                        let (count, sum) = batches(&store);
                        let now = (Instant::now(), count, sum, frames.load(Ordering::Relaxed));
                        *mark.lock().unwrap() = Some((now, wchar()));
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        let end = Instant::now();
        // Let the frame counter see the last commit.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let ((t0, b0, m0, f0), w0) = mark.lock().unwrap().unwrap_or(((started, 0, 0.0, 0), 0));
        let (b1, m1) = batches(&store);
        let measured = (total - warmup) as f64;
        let frames = frames.load(Ordering::Relaxed) - f0;
        let page = page.load(Ordering::Relaxed);
        println!("messages={total} warmup={warmup} rooms={rooms} inflight={inflight} page={page}");
        println!(
            "RESULT msgs_per_s={:.0} mean_batch={:.1} wal_frames_per_msg={:.2} \
             wal_bytes_per_msg={:.0} write_syscall_bytes_per_msg={:.0} total_s={:.2}",
            measured / end.duration_since(t0).as_secs_f64(),
            (m1 - m0) / (b1 - b0).max(1) as f64,
            frames as f64 / measured,
            (frames * (page + 24)) as f64 / measured,
            (wchar() - w0) as f64 / measured,
            end.duration_since(started).as_secs_f64(),
        );
        store.close().await.unwrap();
    });
    stop.store(true, Ordering::Relaxed);
    counter.join().unwrap();
    println!(
        "db_bytes={}",
        std::fs::metadata(&path).map_or(0, |m| m.len())
    );
}
