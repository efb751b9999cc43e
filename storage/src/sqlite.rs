//! The embedded backend: SQLite in WAL mode with `synchronous=FULL`, one group-commit writer
//! thread and two small pools of reader threads.
//!
//! # Why this shape
//!
//! - **Durability.** A write is acknowledged only after its transaction committed with
//!   `synchronous=FULL`: SQLite has fsynced the write-ahead log, so the write survives a crash of
//!   the process (`kill -9`) and a power loss alike.
//! - **WAL.** Readers never block the writer and the writer never blocks readers; a commit is one
//!   sequential append to the log plus one fsync, not a rewrite of database pages.
//! - **Group commit.** An fsync costs the same for one message as for a thousand, so one writer
//!   thread takes the first queued request, drains whatever else is already queued (up to
//!   [`SqliteConfig::max_batch`]) and commits all of it in one `BEGIN IMMEDIATE … COMMIT`.
//!   Throughput then grows with load instead of being capped at one fsync per message. The
//!   caller chooses each message's `seq`; the single writer keeps the fence cheap: it checks
//!   the seq against a cached per-room counter inside the transaction, so `seq` never has gaps
//!   and a stale writer is refused.
//! - **Idempotency in the same transaction.** The unique index on `(message_id, room_no)` is
//!   read before each insert, inside the batch's transaction, so a retry (also one after a
//!   crash, with a fresh seq) finds the original and stores nothing.
//! - **Append order on disk.** A group commit writes every page it dirtied to the log, and
//!   small messages spread over many rooms dirtied one B-tree leaf per message when rows were
//!   clustered by `(tenant, room, seq)` (plus one of the id index, plus the room row's
//!   `last_seq`). So messages live in a rowid table in append order (a batch fills the
//!   rightmost pages), rooms get an integer `room_no` that keys the `(room_no, seq)` index,
//!   participants and markers instead of two TEXT columns, the id index leads with the
//!   time-ordered message id, and the room row is not updated per batch (the writer caches
//!   each room's `room_no` and counters; on a miss they come from the room's last message).
//!   `examples/many_rooms` (300,000 100-byte messages over 2,000 rooms, release build, 3
//!   alternating pairs): WAL bytes per message 12.5 KB → 1.56 KB (3.05 → 0.38 pages), durable
//!   messages/s 22.7–26.0 k → 76–97 k. The profiling study measured the same shape at 11–16
//!   KB/message before and 8× less after.
//! - **Maintained unread counters.** A room's `last_seq` and note count are those of its last
//!   message; each message keeps the number of notes up to it; each `(room, user)` marker row
//!   keeps what the user sent and how much of it lies below the marker. An unread count is then arithmetic on
//!   two rows, never a count over the room's messages (see [`ReadState`]).
//! - **Checkpoints off the commit path.** SQLite's automatic checkpoint runs inside the commit
//!   that crosses the threshold, copying pages into the database file and fsyncing it while every
//!   message of that batch (and those queued behind it) waits: a latency spike of tens of
//!   milliseconds every few megabytes of log. Here the writer never checkpoints; a checkpointer
//!   thread with its own connection runs a `PASSIVE` checkpoint (which never blocks the writer)
//!   every [`CHECKPOINT_INTERVAL`], and a `RESTART` one only when the log passed
//!   [`WAL_RESTART_FRAMES`] because passive ones could not catch up under continuous writes.
//! - **A page cache sized for the writer.** Every append walks the indexes of its room; SQLite's
//!   default 2 MB cache spills once a few thousand rooms are active, and each miss is a read
//!   syscall and a copy. The writer's cache is [`WRITER_CACHE_KIB`] (64 MiB at most, grown on
//!   demand): +30 % durable messages/s in the chat-heavy load test (2,000 rooms × 3 members).
//! - **All or nothing per batch.** If the transaction fails (disk full, I/O error) it is rolled
//!   back and every request of the batch fails with [`Error::NotApplied`]; nothing of it was
//!   applied, so callers can retry. When `COMMIT` itself fails (an I/O error while syncing the
//!   log) the batch may be durable after all: its requests fail with [`Error::OutcomeUnknown`],
//!   and a retry with the same ids is answered from what was stored. A problem with one request
//!   (an unknown room) fails only that request: it is detected before anything is written.
//! - **Point lookups never wait behind scans.** Room loads, message-by-id and read-marker
//!   lookups (one index probe each, on the join and read-receipt paths) run on their own reader
//!   connections; history, search and unread counts, which may read many rows, run on the others.
//!   A burst of searches then delays other searches, never a join.
//! - **Search by index.** Every message's words (the word rules of `crate::words`, shared with
//!   the CQL backend) go into an FTS5 index in the transaction that stores the message (schema
//!   version 4, `SCHEMA_V4`), keyed by room and seq. A search reads the postings of its words in
//!   its room between its cursors, in seq order, and stops after a page of hits: a rare word
//!   deep in a large room is one request, a word common in other rooms costs nothing here.
//!   Keeping the index costs writes: `examples/search_cost` (300,000 ~100-byte messages of ~15
//!   words over 2,000 rooms, release build, 2 alternating pairs against the scan-only build on a
//!   busy 2-core machine): durable messages/s 37.3–37.6 k → 23.8–24.3 k, write bytes per message
//!   1.95–2.04 KB → 2.56–2.73 KB, database +17 %; `examples/many_rooms` (3 words a message):
//!   52.7–52.9 k → 36.8–42.6 k. Searches in a 200,000-message room: a word in 2 messages took
//!   20 requests and 137–178 ms (median) by scan, 1 request and 0.07–0.08 ms by index.
//! - **Bounded requests.** A search examines at most [`SqliteConfig::search_scan_rows`] index
//!   hits and at most [`SqliteConfig::search_time`]; a history read that skips notes scans at
//!   most `search_scan_rows` rows of the room (the limit is part of the query, so SQLite reads no
//!   more). Either answers with what it found and a cursor to continue from, so no request holds
//!   a reader for a whole room.
//! - **Blocking work off the async threads.** The futures only enqueue work on bounded channels
//!   and await a [`tokio::sync::oneshot`] reply, so they work on any runtime flavour and never
//!   block a shard thread.

/// The writer's maps of rooms and senders, looked up per append: foldhash, seeded per map
/// from a random per-process secret like the standard hasher, and cheaper than its SipHash for
/// short keys.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use rusqlite::types::{Type, Value};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior};
use tokio::sync::{oneshot, watch};

use prometheus::core::Collector;
use prometheus::{Histogram, HistogramOpts, IntCounter};

use crate::model::ScanOutcome;
use crate::records::{ListPage, ListQuery, Listed};
use crate::words::{contains_words, words};
use crate::{
    Appended, Direction, Error, HistoryPage, HistoryQuery, Message, MessageType, NewMessage,
    NewRoom, Options, ReadState, Record, RecordKey, RecordKind, Result, Room, RoomKey, RoomKind,
    SearchQuery, SenderType, Store, Timestamp,
};

/// How often the checkpointer copies the write-ahead log into the database.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);
/// Log length (in pages) past which the checkpointer makes the next writer start the log over,
/// briefly holding writers back, so the log cannot grow without bound under continuous writes.
pub const WAL_RESTART_FRAMES: i64 = 8_192;

/// The writer connection's page cache, in KiB.
pub const WRITER_CACHE_KIB: i64 = 64 * 1024;

/// The schema version this code writes and understands (`PRAGMA user_version`).
pub const SCHEMA_VERSION: u32 = 6;

/// Default of [`SqliteConfig::queue_capacity`]: eight full batches. Writes queued beyond that
/// would wait for more than eight commits (fsyncs) and hold their messages in memory meanwhile;
/// failing them fast with [`Error::NotApplied`] lets callers retry or shed load instead.
pub const DEFAULT_QUEUE_CAPACITY: usize = 8_192;

/// Longest prefix of a word the search index keeps, in bytes: a long word (a pasted token, a
/// run of CJK text) costs no more index space than this, and a search for it checks the hits of
/// the prefix against the whole word.
const MAX_INDEXED_WORD: usize = 64;

/// Page size of a history query whose `limit` is 0.
const DEFAULT_HISTORY_LIMIT: u32 = 50;

/// The writer forgets its per-room cache (`room_no` and counters) when it grows past this many
/// rooms.
const MAX_CACHED_ROOMS: usize = 100_000;

/// Tuning of the embedded backend (from the store URL's parameters, see
/// [`SqliteConfig::from_params`]).
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    /// Most write requests committed in one transaction.
    pub max_batch: usize,
    /// Most write requests (and, separately, read requests of each reader pool) waiting in the
    /// queue; beyond that requests fail fast with [`Error::NotApplied`].
    pub queue_capacity: usize,
    /// Reader threads for history, search and unread counts, each with its own read-only
    /// connection.
    pub readers: usize,
    /// Reader threads for point lookups (room loads, message by id, read markers), so they
    /// never queue behind history reads.
    pub lookup_readers: usize,
    /// Most index hits one search request examines (each a message read and checked against
    /// the word rules), and most rows one history read that skips notes scans, before it answers
    /// with what it found and a continuation cursor. A search fills its page well before that
    /// unless the page is larger or its hits fail the whole-word check (words longer than the
    /// index keeps).
    pub search_scan_rows: u32,
    /// Longest one search request may keep its reader busy (reading long messages costs more
    /// than rows alone tell). A search that runs out answers like one that ran out of hits.
    pub search_time: Duration,
    /// How long a connection waits for a lock held by another process before giving up.
    pub busy_timeout: Duration,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        SqliteConfig {
            max_batch: 1024,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            readers: 4,
            lookup_readers: 2,
            search_scan_rows: crate::DEFAULT_SCAN_ROWS,
            search_time: crate::DEFAULT_SCAN_TIME,
            busy_timeout: Duration::from_secs(5),
        }
    }
}

impl SqliteConfig {
    /// The tuning a `sqlite://path?…` URL asks for: `max_batch`, `queue_capacity`, `readers`,
    /// `lookup_readers`, `busy_timeout_ms`; the scan budgets come from `options`.
    pub fn from_params(params: Vec<(&str, &str)>, options: &Options) -> Result<SqliteConfig> {
        let mut config = SqliteConfig {
            search_scan_rows: options.scan_rows,
            search_time: options.scan_time,
            ..SqliteConfig::default()
        };
        for (name, value) in params {
            match name {
                "max_batch" => config.max_batch = crate::param(name, value)?,
                "queue_capacity" => config.queue_capacity = crate::param(name, value)?,
                "readers" => config.readers = crate::param(name, value)?,
                "lookup_readers" => config.lookup_readers = crate::param(name, value)?,
                "busy_timeout_ms" => {
                    config.busy_timeout = Duration::from_millis(crate::param(name, value)?)
                }
                other => {
                    return Err(Error::BadUrl(format!(
                        "unknown sqlite parameter {other:?} (known: max_batch, queue_capacity, \
                         readers, lookup_readers, busy_timeout_ms)"
                    )))
                }
            }
        }
        Ok(config)
    }
}

/// What the group-commit writer reports about itself.
#[derive(Debug, Clone)]
struct WriterMetrics {
    commit_seconds: Histogram,
    batch_size: Histogram,
    commit_failures: IntCounter,
}

impl WriterMetrics {
    fn new() -> Self {
        let commit_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "gateway_store_commit_seconds",
                "duration of one group commit of the store",
            )
            .buckets(vec![
                0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )
        .expect("valid histogram options");
        let batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "gateway_store_batch_size",
                "write requests committed together in one transaction",
            )
            .buckets(vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ]),
        )
        .expect("valid histogram options");
        let commit_failures = IntCounter::new(
            "gateway_store_commit_failures_total",
            "group commits that failed (their writes were answered UNAVAILABLE)",
        )
        .expect("valid counter options");
        WriterMetrics {
            commit_seconds,
            batch_size,
            commit_failures,
        }
    }
}

/// The SQLite store. Cloning is cheap; every clone talks to the same writer and readers.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

struct Inner {
    /// `None` once closed. Taking it under the write lock orders `close` after every request
    /// already queued: the writer drains them, sees the channel disconnected and stops.
    writes: RwLock<Option<Sender<WriteRequest>>>,
    reads: RwLock<Option<Readers>>,
    /// [`SqliteConfig::search_scan_rows`], at least 1.
    search_scan_rows: u32,
    /// [`SqliteConfig::search_time`].
    search_time: Duration,
    metrics: WriterMetrics,
    /// Never written: every worker thread holds the sender, so `changed()` fails once they all
    /// have stopped.
    stopped: watch::Receiver<()>,
}

type Reply<T> = oneshot::Sender<Result<T>>;
type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// The queues of the two reader pools.
struct Readers {
    scans: Sender<ReadJob>,
    lookups: Sender<ReadJob>,
}

/// Which reader pool runs a read.
#[derive(Debug, Clone, Copy)]
enum Pool {
    /// History, search, counts: may read many rows.
    Scan,
    /// One index probe.
    Lookup,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and starts the writer and reader
    /// threads.
    pub fn open(path: &Path, config: SqliteConfig) -> Result<SqliteStore> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                Error::NotApplied(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        let write_conn = open_writer(path, config.busy_timeout)?;
        let checkpoint_conn = open_checkpointer(path, config.busy_timeout)?;
        let metrics = WriterMetrics::new();
        let readers = config.readers.max(1);
        let lookup_readers = config.lookup_readers.max(1);
        let read_conns = (0..readers + lookup_readers)
            .map(|_| open_reader(path, config.busy_timeout))
            .collect::<Result<Vec<_>>>()?;

        let capacity = config.queue_capacity.max(1);
        let (write_tx, write_rx) = crossbeam_channel::bounded(capacity);
        let (scan_tx, scan_rx) = crossbeam_channel::bounded::<ReadJob>(capacity);
        let (lookup_tx, lookup_rx) = crossbeam_channel::bounded::<ReadJob>(capacity);
        let (stopped_tx, stopped_rx) = watch::channel(());
        let stopped_tx = Arc::new(stopped_tx);

        let (stop_checkpoints, checkpoint_stop) = crossbeam_channel::bounded::<()>(1);
        let checkpointer = std::thread::Builder::new()
            .name("store-checkpointer".to_owned())
            .spawn(move || run_checkpointer(&checkpoint_conn, &checkpoint_stop))
            .map_err(|e| Error::NotApplied(format!("cannot start the checkpointer: {e}")))?;
        let writer = Writer {
            conn: write_conn,
            cache: HashMap::default(),
            max_batch: config.max_batch.max(1),
            metrics: metrics.clone(),
            checkpointer: Some((stop_checkpoints, checkpointer)),
        };
        let guard = Arc::clone(&stopped_tx);
        std::thread::Builder::new()
            .name("store-writer".to_owned())
            .spawn(move || {
                writer.run(&write_rx);
                drop(guard);
            })
            .map_err(|e| Error::NotApplied(format!("cannot start the writer thread: {e}")))?;
        for (index, conn) in read_conns.into_iter().enumerate() {
            let (jobs, name) = if index < readers {
                (scan_rx.clone(), format!("store-reader-{index}"))
            } else {
                (
                    lookup_rx.clone(),
                    format!("store-lookup-{}", index - readers),
                )
            };
            let guard = Arc::clone(&stopped_tx);
            std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    run_reader(&conn, &jobs);
                    drop(guard);
                })
                .map_err(|e| Error::NotApplied(format!("cannot start a reader thread: {e}")))?;
        }
        tracing::info!(path = %path.display(), readers, lookup_readers, "sqlite store open");
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                writes: RwLock::new(Some(write_tx)),
                reads: RwLock::new(Some(Readers {
                    scans: scan_tx,
                    lookups: lookup_tx,
                })),
                search_scan_rows: config.search_scan_rows.max(1),
                search_time: config.search_time,
                metrics,
                stopped: stopped_rx,
            }),
        })
    }

    /// Queues a write; the reply arrives once the batch holding it committed.
    fn write<T>(&self, make: impl FnOnce(Reply<T>) -> WriteRequest) -> PendingReply<T> {
        let (reply, rx) = oneshot::channel();
        let request = make(reply);
        let guard = self
            .inner
            .writes
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let sent = match guard.as_ref() {
            None => Err(Error::Closed),
            Some(tx) => tx.try_send(request).map_err(|e| match e {
                TrySendError::Full(_) => Error::NotApplied("write queue full".to_owned()),
                TrySendError::Disconnected(_) => Error::Closed,
            }),
        };
        PendingReply { sent, rx }
    }

    /// Runs `f` on a reader thread of `pool`.
    fn read<T: Send + 'static>(
        &self,
        pool: Pool,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> PendingReply<T> {
        let (reply, rx) = oneshot::channel();
        let job: ReadJob = Box::new(move |conn| {
            let _ = reply.send(f(conn).map_err(|e| db_error("read", &e)));
        });
        let guard = self
            .inner
            .reads
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let sent = match guard.as_ref() {
            None => Err(Error::Closed),
            Some(readers) => match pool {
                Pool::Scan => &readers.scans,
                Pool::Lookup => &readers.lookups,
            }
            .try_send(job)
            .map_err(|e| match e {
                TrySendError::Full(_) => Error::NotApplied("read queue full".to_owned()),
                TrySendError::Disconnected(_) => Error::Closed,
            }),
        };
        PendingReply { sent, rx }
    }

    /// The writer's metrics (group commit duration, batch size, failures), for a registry.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        let metrics = &self.inner.metrics;
        vec![
            Box::new(metrics.commit_seconds.clone()),
            Box::new(metrics.batch_size.clone()),
            Box::new(metrics.commit_failures.clone()),
        ]
    }

    fn scan_budget(&self) -> SearchBudget {
        SearchBudget {
            rows: self.inner.search_scan_rows,
            time: self.inner.search_time,
        }
    }

    fn is_closed(&self) -> bool {
        self.inner
            .writes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }
}

/// A queued request and the channel its answer comes back on.
struct PendingReply<T> {
    sent: Result<()>,
    rx: oneshot::Receiver<Result<T>>,
}

impl<T> PendingReply<T> {
    async fn wait(self, store: &SqliteStore) -> Result<T> {
        self.sent?;
        match self.rx.await {
            Ok(result) => result,
            // The worker dropped the request without answering: it stopped (closed) or panicked.
            Err(_) if store.is_closed() => Err(Error::Closed),
            Err(_) => Err(Error::NotApplied("storage worker stopped".to_owned())),
        }
    }

    /// As [`PendingReply::wait`], owning what it needs (for `'static` futures).
    async fn wait_owned(self, store: SqliteStore) -> Result<T> {
        self.wait(&store).await
    }
}

impl Store for SqliteStore {
    fn append(
        &self,
        message: NewMessage,
    ) -> impl std::future::Future<Output = Result<Appended>> + Send + 'static {
        // Queued here, before the future is polled: appends keep the order of the calls.
        let pending = self.write(|reply| WriteRequest::Append { message, reply });
        pending.wait_owned(self.clone())
    }

    async fn create_room(&self, room: NewRoom) -> Result<(Room, bool)> {
        self.write(|reply| WriteRequest::CreateRoom { room, reply })
            .wait(self)
            .await
    }

    async fn room(&self, room: &RoomKey) -> Result<Option<Room>> {
        let room = room.clone();
        self.read(Pool::Lookup, move |conn| {
            let tx = conn.unchecked_transaction()?;
            load_room(&tx, &room)
        })
        .wait(self)
        .await
    }

    async fn add_participant(&self, room: &RoomKey, user_id: &str) -> Result<Room> {
        let (room, user_id) = (room.clone(), user_id.to_owned());
        self.write(|reply| WriteRequest::AddParticipant {
            room,
            user_id,
            reply,
        })
        .wait(self)
        .await
    }

    async fn history(&self, room: &RoomKey, query: HistoryQuery) -> Result<HistoryPage> {
        let room = room.clone();
        let budget = self.scan_budget();
        self.read(Pool::Scan, move |conn| {
            read_history(conn, &room, &query, budget.rows)
        })
        .wait(self)
        .await
    }

    async fn search(&self, room: &RoomKey, query: SearchQuery) -> Result<HistoryPage> {
        let room = room.clone();
        let budget = self.scan_budget();
        self.read(Pool::Scan, move |conn| search(conn, &room, &query, budget))
            .wait(self)
            .await
    }

    async fn message_by_id(&self, room: &RoomKey, message_id: &str) -> Result<Option<Message>> {
        let (room, message_id) = (room.clone(), message_id.to_owned());
        self.read(Pool::Lookup, move |conn| {
            message_by_id(conn, &room, &message_id)
        })
        .wait(self)
        .await
    }

    async fn mark_read(&self, room: &RoomKey, user_id: &str, seq: u64) -> Result<ReadState> {
        let (room, user_id) = (room.clone(), user_id.to_owned());
        self.write(|reply| WriteRequest::MarkRead {
            room,
            user_id,
            seq,
            reply,
        })
        .wait(self)
        .await
    }

    async fn read_state(&self, room: &RoomKey, user_id: &str) -> Result<ReadState> {
        let (room, user_id) = (room.clone(), user_id.to_owned());
        self.read(Pool::Lookup, move |conn| {
            let tx = conn.unchecked_transaction()?;
            let Some(state) = stored_room_state(&tx, &room)? else {
                return Ok(ReadState::default());
            };
            Ok(marker_row(&tx, state.no, &user_id)?.state(state.counters))
        })
        .wait(self)
        .await
    }

    async fn record(&self, key: &RecordKey) -> Result<Option<Record>> {
        let key = key.clone();
        self.read(Pool::Lookup, move |conn| read_record(conn, &key))
            .wait(self)
            .await
    }

    async fn put_record(&self, record: Record) -> Result<Record> {
        self.write(|reply| WriteRequest::PutRecord { record, reply })
            .wait(self)
            .await
    }

    async fn list_records(
        &self,
        tenant_id: &str,
        kind: RecordKind,
        query: ListQuery,
    ) -> Result<ListPage> {
        let tenant_id = tenant_id.to_owned();
        self.read(Pool::Lookup, move |conn| {
            list_records(conn, &tenant_id, kind, &query)
        })
        .wait(self)
        .await
    }

    async fn close(&self) -> Result<()> {
        // Dropping the senders disconnects the queues: the workers finish what was queued before
        // (the writer commits it), then stop.
        let writes = self
            .inner
            .writes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let reads = self
            .inner
            .reads
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let first = writes.is_some();
        drop((writes, reads));
        let mut stopped = self.inner.stopped.clone();
        while stopped.changed().await.is_ok() {}
        if first {
            tracing::info!("sqlite store closed");
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Connections and schema

fn open_writer(path: &Path, busy_timeout: Duration) -> Result<Connection> {
    let conn = Connection::open(path).map_err(|e| db_error("open", &e))?;
    let setup = || -> rusqlite::Result<String> {
        conn.busy_timeout(busy_timeout)?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Only has an effect on macOS, where a plain fsync does not reach the platter.
        conn.pragma_update(None, "fullfsync", true)?;
        conn.pragma_update(None, "checkpoint_fullfsync", true)?;
        conn.pragma_update(None, "foreign_keys", true)?;
        // The writer walks the indexes of every room it appends to; with SQLite's default
        // 2 MB page cache a few thousand active rooms already spill, and every miss is a read
        // syscall and a copy from the OS page cache.
        conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
        // The checkpointer thread does it, off the commit path.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.set_prepared_statement_cache_capacity(32);
        Ok(mode)
    };
    let mode = setup().map_err(|e| db_error("configure", &e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::NotApplied(format!(
            "sqlite journal_mode is {mode}, wanted wal"
        )));
    }
    migrate(&conn)?;
    Ok(conn)
}

fn open_checkpointer(path: &Path, busy_timeout: Duration) -> Result<Connection> {
    let conn = Connection::open(path).map_err(|e| db_error("open", &e))?;
    let setup = || -> rusqlite::Result<()> {
        conn.busy_timeout(busy_timeout)?;
        // A checkpoint fsyncs the database file before the log may be reused.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "checkpoint_fullfsync", true)?;
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(())
    };
    setup().map_err(|e| db_error("configure", &e))?;
    Ok(conn)
}

/// Checkpoints the log every [`CHECKPOINT_INTERVAL`] until `stop` disconnects.
fn run_checkpointer(conn: &Connection, stop: &Receiver<()>) {
    loop {
        match stop.recv_timeout(CHECKPOINT_INTERVAL) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        // (busy, pages in the log, pages checkpointed)
        let passive = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
        });
        match passive {
            Ok((log, _)) if log >= WAL_RESTART_FRAMES => {
                if let Err(error) = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
                {
                    tracing::warn!(%error, "sqlite wal restart checkpoint failed");
                }
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "sqlite wal checkpoint failed"),
        }
    }
}

fn open_reader(path: &Path, busy_timeout: Duration) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| db_error("open", &e))?;
    conn.busy_timeout(busy_timeout)
        .map_err(|e| db_error("configure", &e))?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

/// Brings the schema to [`SCHEMA_VERSION`], one step per version.
fn migrate(conn: &Connection) -> Result<()> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|e| db_error("read schema version", &e))?;
    if version > i64::from(SCHEMA_VERSION) {
        return Err(Error::Schema(format!(
            "database schema version {version} is newer than this build understands ({SCHEMA_VERSION})"
        )));
    }
    if version < 1 {
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {SCHEMA_V3} {SCHEMA_V4} {SCHEMA_V5_RECORDS} {SCHEMA_V6} COMMIT;"
        ))
        .map_err(|e| db_error("create schema", &e))?;
        tracing::info!(version = SCHEMA_VERSION, "sqlite schema created");
        return Ok(());
    }
    if version < 2 {
        migrate_v1_to_v2(conn)?;
    }
    if version < 3 {
        let sql =
            format!("BEGIN IMMEDIATE; {SCHEMA_V2_ASIDE} {SCHEMA_V3} {SCHEMA_V2_TO_V3} COMMIT;");
        rebuild(conn, &sql, 3)?;
    }
    if version < 4 {
        migrate_v3_to_v4(conn)?;
    }
    if version < 5 {
        conn.execute_batch(&format!("BEGIN IMMEDIATE; {SCHEMA_V5_RECORDS} COMMIT;"))
            .map_err(|e| db_error("migrate schema to version 5", &e))?;
        tracing::info!(version = 5, "sqlite schema migrated");
    }
    if version < 6 {
        conn.execute_batch(&format!("BEGIN IMMEDIATE; {SCHEMA_V6} COMMIT;"))
            .map_err(|e| db_error("migrate schema to version 6", &e))?;
        tracing::info!(version = 6, "sqlite schema migrated");
    }
    Ok(())
}

/// Version 4 adds the search index ([`SCHEMA_V4`]) and fills it from every stored message, in
/// one transaction (about as long as reading every message once; a crash leaves version 3).
fn migrate_v3_to_v4(conn: &Connection) -> Result<()> {
    let run = || -> rusqlite::Result<u64> {
        let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
        tx.execute_batch(SCHEMA_V4)?;
        let indexed = index_messages(&tx, 0)?;
        tx.commit()?;
        Ok(indexed)
    };
    let indexed = run().map_err(|e| db_error("migrate schema to version 4", &e))?;
    tracing::info!(version = 4, indexed, "sqlite schema migrated");
    Ok(())
}

/// Adds the messages with a rowid from `first_id` on to the search index (the migration to
/// version 4; appends index their message themselves), in key order. Returns how many it read.
fn index_messages(tx: &Connection, first_id: i64) -> rusqlite::Result<u64> {
    let mut read = tx.prepare(
        "SELECT room_no, seq, direction = 'NOTE', message FROM messages WHERE id >= ?1
         ORDER BY room_no, seq",
    )?;
    let mut insert = tx.prepare(INDEX_INSERT_SQL)?;
    let mut rows = read.query([first_id])?;
    let mut count = 0;
    while let Some(row) = rows.next()? {
        let (room_no, seq): (i64, i64) = (row.get(0)?, row.get(1)?);
        let key = index_key(room_no, to_u64(seq)).ok_or_else(|| {
            rusqlite::Error::ToSqlConversionFailure(
                format!("seq {seq} of room {room_no} is beyond the search index's keys").into(),
            )
        })?;
        let text: String = row.get(3)?;
        if let Some(tokens) = index_tokens(row.get(2)?, &text) {
            insert.execute(params![key, tokens])?;
        }
        count += 1;
    }
    Ok(count)
}

/// Runs `sql`, a migration that rebuilds tables under their own names in one transaction, to
/// reach `version`. Foreign keys are off meanwhile so that they are not checked against
/// half-copied tables (the pragma is a no-op inside a transaction).
fn rebuild(conn: &Connection, sql: &str, version: u32) -> Result<()> {
    conn.pragma_update(None, "foreign_keys", false)
        .map_err(|e| db_error("migrate schema", &e))?;
    let result = conn.execute_batch(sql);
    if result.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    let restored = conn.pragma_update(None, "foreign_keys", true);
    result.map_err(|e| db_error(&format!("migrate schema to version {version}"), &e))?;
    restored.map_err(|e| db_error("migrate schema", &e))?;
    tracing::info!(version, "sqlite schema migrated");
    Ok(())
}

/// Moves the version 2 tables (and the index whose name version 3 reuses) aside.
const SCHEMA_V2_ASIDE: &str = "
DROP INDEX messages_by_id;
ALTER TABLE rooms RENAME TO rooms_v2;
ALTER TABLE room_participants RENAME TO room_participants_v2;
ALTER TABLE messages RENAME TO messages_v2;
ALTER TABLE read_markers RENAME TO read_markers_v2;
";

/// Version 3 is the append-order layout with maintained unread counters (see [`SCHEMA_V3`]).
/// The version 2 tables are moved aside ([`SCHEMA_V2_ASIDE`]), the new ones created, every row copied under its
/// room's new `room_no` and the old tables dropped, all in one transaction. Each message's
/// notes up to it come from a window over its room; each `(room, user)` marker row (one is made
/// for every sender) gets what the user sent and how much of it lies below the marker, computed
/// once, here (a scan of the room's messages per marker row; later reads never count).
const SCHEMA_V2_TO_V3: &str = "
INSERT INTO rooms (tenant_id, room_id, kind, title, status, created_at)
    SELECT tenant_id, room_id, kind, title, status, created_at FROM rooms_v2
    ORDER BY created_at, tenant_id, room_id;
INSERT INTO room_participants (room_no, user_id, position)
    SELECT r.room_no, p.user_id, p.position
    FROM room_participants_v2 p JOIN rooms r USING (tenant_id, room_id);
INSERT INTO messages (room_no, seq, message_id, sender, sender_type, direction, type, message,
                      attached_files, reply_to, mentions, metadata, created_at, notes_upto)
    SELECT r.room_no, m.seq, m.message_id, m.sender, m.sender_type, m.direction, m.type,
           m.message, m.attached_files, m.reply_to, m.mentions, m.metadata, m.created_at,
           SUM(m.direction = 'NOTE') OVER (PARTITION BY r.room_no ORDER BY m.seq)
    FROM messages_v2 m JOIN rooms r USING (tenant_id, room_id)
    ORDER BY r.room_no, m.seq;
INSERT INTO read_markers (room_no, user_id, seq)
    SELECT r.room_no, k.user_id, k.seq
    FROM read_markers_v2 k JOIN rooms r USING (tenant_id, room_id);
INSERT INTO read_markers (room_no, user_id, seq)
    SELECT DISTINCT room_no, sender, 0 FROM messages WHERE true
    ON CONFLICT DO NOTHING;
UPDATE read_markers SET
    sent_total = (SELECT COUNT(*) FROM messages m WHERE m.room_no = read_markers.room_no
        AND m.sender = read_markers.user_id),
    sent_notes_total = (SELECT COUNT(*) FROM messages m WHERE m.room_no = read_markers.room_no
        AND m.sender = read_markers.user_id AND m.direction = 'NOTE'),
    sent_read = (SELECT COUNT(*) FROM messages m WHERE m.room_no = read_markers.room_no
        AND m.sender = read_markers.user_id AND m.seq <= read_markers.seq),
    sent_notes_read = (SELECT COUNT(*) FROM messages m WHERE m.room_no = read_markers.room_no
        AND m.sender = read_markers.user_id AND m.direction = 'NOTE'
        AND m.seq <= read_markers.seq),
    last_sent_seq = COALESCE((SELECT MAX(seq) FROM messages m
        WHERE m.room_no = read_markers.room_no AND m.sender = read_markers.user_id), 0),
    notes_read = COALESCE((SELECT notes_upto FROM messages m
        WHERE m.room_no = read_markers.room_no AND m.seq = read_markers.seq), 0);
DROP TABLE read_markers_v2;
DROP TABLE messages_v2;
DROP TABLE room_participants_v2;
DROP TABLE rooms_v2;
";

/// Version 1 keyed rooms by `room_id` alone; version 2 keys every room record by
/// `(tenant_id, room_id)`. The old tables are renamed aside, the new ones created, every row
/// copied with its room's tenant (taken from the old `rooms` table) and the old tables dropped,
/// all in one transaction: a crash leaves either version, never a mix.
fn migrate_v1_to_v2(conn: &Connection) -> Result<()> {
    rebuild(
        conn,
        &format!(
            "BEGIN IMMEDIATE;
             DROP INDEX messages_by_id;
             ALTER TABLE rooms RENAME TO rooms_v1;
             ALTER TABLE room_participants RENAME TO room_participants_v1;
             ALTER TABLE messages RENAME TO messages_v1;
             ALTER TABLE read_markers RENAME TO read_markers_v1;
             {SCHEMA_V2}
             INSERT INTO rooms (tenant_id, room_id, kind, title, status, created_at, last_seq)
                 SELECT tenant_id, room_id, kind, title, status, created_at, last_seq FROM rooms_v1;
             INSERT INTO room_participants (tenant_id, room_id, user_id, position)
                 SELECT r.tenant_id, p.room_id, p.user_id, p.position
                 FROM room_participants_v1 p JOIN rooms_v1 r USING (room_id);
             INSERT INTO messages (tenant_id, room_id, seq, message_id, sender, sender_type,
                                   direction, type, message, attached_files, reply_to, mentions,
                                   metadata, created_at)
                 SELECT r.tenant_id, m.room_id, m.seq, m.message_id, m.sender, m.sender_type,
                        m.direction, m.type, m.message, m.attached_files, m.reply_to, m.mentions,
                        m.metadata, m.created_at
                 FROM messages_v1 m JOIN rooms_v1 r USING (room_id);
             INSERT INTO read_markers (tenant_id, room_id, user_id, seq)
                 SELECT r.tenant_id, k.room_id, k.user_id, k.seq
                 FROM read_markers_v1 k JOIN rooms_v1 r USING (room_id);
             DROP TABLE read_markers_v1;
             DROP TABLE messages_v1;
             DROP TABLE room_participants_v1;
             DROP TABLE rooms_v1;
             COMMIT;"
        ),
        2,
    )
}

/// Version 2 (the step after version 1), without its transaction.
const SCHEMA_V2: &str = "
CREATE TABLE rooms (
    tenant_id  TEXT NOT NULL,
    room_id    TEXT NOT NULL,
    kind       TEXT NOT NULL,
    title      TEXT NOT NULL,
    status     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    last_seq   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, room_id)
) WITHOUT ROWID;
CREATE TABLE room_participants (
    tenant_id TEXT NOT NULL,
    room_id   TEXT NOT NULL,
    user_id   TEXT NOT NULL,
    position  INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, room_id, user_id),
    FOREIGN KEY (tenant_id, room_id) REFERENCES rooms (tenant_id, room_id)
) WITHOUT ROWID;
CREATE TABLE messages (
    tenant_id      TEXT NOT NULL,
    room_id        TEXT NOT NULL,
    seq            INTEGER NOT NULL,
    message_id     TEXT NOT NULL,
    sender         TEXT NOT NULL,
    sender_type    TEXT NOT NULL,
    direction      TEXT NOT NULL,
    type           TEXT NOT NULL,
    message        TEXT NOT NULL,
    attached_files TEXT NOT NULL,
    reply_to       TEXT,
    mentions       TEXT NOT NULL,
    metadata       TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, room_id, seq),
    FOREIGN KEY (tenant_id, room_id) REFERENCES rooms (tenant_id, room_id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX messages_by_id ON messages (tenant_id, room_id, message_id);
CREATE TABLE read_markers (
    tenant_id TEXT NOT NULL,
    room_id   TEXT NOT NULL,
    user_id   TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, room_id, user_id),
    FOREIGN KEY (tenant_id, room_id) REFERENCES rooms (tenant_id, room_id)
) WITHOUT ROWID;
PRAGMA user_version = 2;
";

/// The current schema, without its transaction (shared by creation and migration).
///
/// Messages live in a rowid table in append order, so the rows of one group commit fill the
/// rightmost pages instead of one leaf per room; the seq index is keyed by the room's integer
/// `room_no` and the id index by the (time-ordered) message id first, so their new entries
/// cluster too. A room's `last_seq` and note count are not stored in the room row (no update
/// per batch): they are those of its last message, found through `messages_by_seq`.
const SCHEMA_V3: &str = "
CREATE TABLE rooms (
    room_no    INTEGER PRIMARY KEY,
    tenant_id  TEXT NOT NULL,
    room_id    TEXT NOT NULL,
    kind       TEXT NOT NULL,
    title      TEXT NOT NULL,
    status     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (tenant_id, room_id)
);
CREATE TABLE room_participants (
    room_no  INTEGER NOT NULL REFERENCES rooms (room_no),
    user_id  TEXT NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (room_no, user_id)
) WITHOUT ROWID;
CREATE TABLE messages (
    id             INTEGER PRIMARY KEY,
    room_no        INTEGER NOT NULL REFERENCES rooms (room_no),
    seq            INTEGER NOT NULL,
    message_id     TEXT NOT NULL,
    sender         TEXT NOT NULL,
    sender_type    TEXT NOT NULL,
    direction      TEXT NOT NULL,
    type           TEXT NOT NULL,
    message        TEXT NOT NULL,
    attached_files TEXT NOT NULL,
    reply_to       TEXT,
    mentions       TEXT NOT NULL,
    metadata       TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    notes_upto     INTEGER NOT NULL
);
CREATE UNIQUE INDEX messages_by_seq ON messages (room_no, seq);
CREATE UNIQUE INDEX messages_by_id ON messages (message_id, room_no);
CREATE TABLE read_markers (
    room_no          INTEGER NOT NULL REFERENCES rooms (room_no),
    user_id          TEXT NOT NULL,
    seq              INTEGER NOT NULL,
    sent_total       INTEGER NOT NULL DEFAULT 0,
    sent_notes_total INTEGER NOT NULL DEFAULT 0,
    sent_read        INTEGER NOT NULL DEFAULT 0,
    sent_notes_read  INTEGER NOT NULL DEFAULT 0,
    last_sent_seq    INTEGER NOT NULL DEFAULT 0,
    notes_read       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (room_no, user_id)
) WITHOUT ROWID;
PRAGMA user_version = 3;
";

/// Version 4: the search index, one entry per message holding the message's distinct words
/// as [`index_tokens`] spells them, keyed by [`index_key`] (the room's number and the seq).
///
/// - **Contentless** (`content=''`): the text is already in `messages`; an external-content
///   table would index the text as stored, while the tokens here are computed (below), and it
///   would have to share the messages' rowids, which are in append order, not room order.
///   Messages are never updated or deleted, the one thing a contentless table cannot do.
/// - **Tokens made by the word rules** (`crate::words`), not by an FTS5 tokenizer: `unicode61`
///   splits words, folds case and strips diacritics by its own Unicode tables (it finds "ete"
///   in "Été"), so its index would disagree with the CQL backend and with the whole-word check.
///   The table's `ascii` tokenizer only splits at the spaces put between the words (no word
///   holds an ASCII separator, checked by a test) and keeps every token as it is.
/// - **Keyed by room and seq**: a word's postings are sorted by room, then seq, so a search
///   reads the slice of its room between its cursors (FTS5 seeks to it), in seq order, whatever
///   other rooms hold; the words are shared by every room, so a group commit over many rooms
///   writes each word once, with its postings.
/// - **Notes apart**: a note's tokens carry [`NOTE_MARK`], so a reader who may not see notes
///   never reads a note's posting.
/// - **`detail=none`, `columnsize=0`**: a search is an AND of single tokens, so the index keeps
///   keys only (no positions) and no per-row sizes (no ranking): the least it can write.
const SCHEMA_V4: &str = "
CREATE VIRTUAL TABLE message_words USING fts5(
    words, content='', tokenize='ascii', detail=none, columnsize=0
);
PRAGMA user_version = 4;
";

/// Adds one message's index entry ([`index_key`], [`index_tokens`]).
const INDEX_INSERT_SQL: &str = "INSERT INTO message_words (rowid, words) VALUES (?1, ?2)";

/// Version 5 adds the records (contacts, inboxes, conversations: see [`crate::records`]), one
/// JSON document per key with its version, and the lists of the listed kinds: `record_list`
/// holds each record's place (`list_key`) since `listed_at`, and, once it moved, until
/// `unlisted_at`, so that a list can be read as it was at an earlier time (a walk over pages
/// sees every record once while records move). Places left more than
/// [`crate::records::LIST_SNAPSHOT_MILLIS`] ago are deleted when the record moves again. The
/// times in `record_list` come from `list_clock`, which every move advances (the wall clock, but
/// always past its last value), inside the writer's transaction: times follow the order of the
/// commits, so a reader that takes the clock's value in its own snapshot has a time that covers
/// every committed move and none still committing.
const SCHEMA_V5_RECORDS: &str = "
CREATE TABLE records (
    tenant_id  TEXT NOT NULL,
    kind       TEXT NOT NULL,
    id         TEXT NOT NULL,
    version    INTEGER NOT NULL,
    body       TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    list_key   INTEGER,
    PRIMARY KEY (tenant_id, kind, id)
) WITHOUT ROWID;
CREATE TABLE record_list (
    tenant_id   TEXT NOT NULL,
    kind        TEXT NOT NULL,
    list_key    INTEGER NOT NULL,
    id          TEXT NOT NULL,
    listed_at   INTEGER NOT NULL,
    unlisted_at INTEGER,
    PRIMARY KEY (tenant_id, kind, list_key, id)
) WITHOUT ROWID;
CREATE INDEX record_list_by_id ON record_list (tenant_id, kind, id);
CREATE TABLE list_clock (
    id    INTEGER PRIMARY KEY CHECK (id = 0),
    stamp INTEGER NOT NULL
);
INSERT INTO list_clock (id, stamp) VALUES (0, 0);
PRAGMA user_version = 5;
";

/// Version 6 indexes `record_list` by record and closing time: every move drops the record's
/// places closed more than five minutes ago, and with this index it reads only those. The
/// version 5 index, by record alone, read every place the record had left in the last five
/// minutes (hundreds, for a busy conversation) on every move.
const SCHEMA_V6: &str = "
DROP INDEX IF EXISTS record_list_by_id;
CREATE INDEX record_list_closed ON record_list (tenant_id, kind, id, unlisted_at);
PRAGMA user_version = 6;
";

fn db_error(what: &str, error: &rusqlite::Error) -> Error {
    Error::NotApplied(format!("sqlite {what} failed: {error}"))
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The writer

enum WriteRequest {
    Append {
        message: NewMessage,
        reply: Reply<Appended>,
    },
    CreateRoom {
        room: NewRoom,
        reply: Reply<(Room, bool)>,
    },
    AddParticipant {
        room: RoomKey,
        user_id: String,
        reply: Reply<Room>,
    },
    MarkRead {
        room: RoomKey,
        user_id: String,
        seq: u64,
        reply: Reply<ReadState>,
    },
    PutRecord {
        record: Record,
        reply: Reply<Record>,
    },
}

impl WriteRequest {
    /// Answers without having applied the request.
    fn fail(self, error: Error) {
        match self {
            WriteRequest::Append { reply, .. } => drop(reply.send(Err(error))),
            WriteRequest::CreateRoom { reply, .. } => drop(reply.send(Err(error))),
            WriteRequest::AddParticipant { reply, .. } => drop(reply.send(Err(error))),
            WriteRequest::MarkRead { reply, .. } => drop(reply.send(Err(error))),
            WriteRequest::PutRecord { reply, .. } => drop(reply.send(Err(error))),
        }
    }
}

/// A request applied inside the open transaction, its answer held until the commit.
enum Applied {
    Append(Reply<Appended>, Result<Appended>),
    CreateRoom(Reply<(Room, bool)>, Result<(Room, bool)>),
    AddParticipant(Reply<Room>, Result<Room>),
    MarkRead(Reply<ReadState>, Result<ReadState>),
    PutRecord(Reply<Record>, Result<Record>),
}

impl Applied {
    fn send(self) {
        match self {
            Applied::Append(reply, result) => drop(reply.send(result)),
            Applied::CreateRoom(reply, result) => drop(reply.send(result)),
            Applied::AddParticipant(reply, result) => drop(reply.send(result)),
            Applied::MarkRead(reply, result) => drop(reply.send(result)),
            Applied::PutRecord(reply, result) => drop(reply.send(result)),
        }
    }

    fn fail(self, error: Error) {
        match self {
            Applied::Append(reply, _) => drop(reply.send(Err(error))),
            Applied::CreateRoom(reply, _) => drop(reply.send(Err(error))),
            Applied::AddParticipant(reply, _) => drop(reply.send(Err(error))),
            Applied::MarkRead(reply, _) => drop(reply.send(Err(error))),
            Applied::PutRecord(reply, _) => drop(reply.send(Err(error))),
        }
    }
}

struct Writer {
    conn: Connection,
    /// Committed state per room. Only ever holds committed values: a batch works on its own
    /// overlay, merged in after `COMMIT`.
    cache: HashMap<RoomKey, RoomState>,
    max_batch: usize,
    metrics: WriterMetrics,
    /// Dropping the sender stops the checkpointer thread.
    checkpointer: Option<(Sender<()>, std::thread::JoinHandle<()>)>,
}

/// A room's maintained counters: those of its last message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct RoomCounters {
    last_seq: u64,
    note_count: u64,
}

/// What the writer knows of a room: its row number (the key of its messages, participants and
/// markers) and its counters.
#[derive(Debug, Clone, Copy)]
struct RoomState {
    no: i64,
    counters: RoomCounters,
}

/// What one sender appended to one room in the batch, not yet added to their marker row.
#[derive(Debug, Default)]
struct SentInBatch {
    messages: u64,
    notes: u64,
    last_seq: u64,
}

/// The state a batch works on: the rooms it looked at and what each sender appended (keyed by
/// `room_no`).
#[derive(Default)]
struct Overlay {
    rooms: HashMap<RoomKey, RoomState>,
    sent: HashMap<(i64, String), SentInBatch>,
    /// The search index entries of the batch's messages: [`index_key`] and tokens.
    index: Vec<(i64, String)>,
    /// The list time of the batch's moves (see `SCHEMA_V5_RECORDS`): one per batch, as a
    /// batch commits at once, past the one before it.
    list_stamp: Option<i64>,
}

impl Overlay {
    /// Adds the batch's messages to the search index, in the batch's transaction (the index
    /// never holds a message that is not stored, nor misses one that is). In key order: FTS5
    /// writes out what it holds whenever a key is lower than the one before, so a batch over
    /// many rooms in arrival order would write one index segment per message.
    fn flush_index(&mut self, tx: &Connection) -> rusqlite::Result<()> {
        if self.index.is_empty() {
            return Ok(());
        }
        self.index.sort_unstable_by_key(|(key, _)| *key);
        let mut insert = tx.prepare_cached(INDEX_INSERT_SQL)?;
        for (key, tokens) in self.index.drain(..) {
            insert.execute(params![key, tokens])?;
        }
        Ok(())
    }

    /// Adds what senders appended in this batch to their marker rows (before a read marker of
    /// the batch reads one, and at the end of the batch).
    fn flush_sent(&mut self, tx: &Connection) -> rusqlite::Result<()> {
        if self.sent.is_empty() {
            return Ok(());
        }
        let mut upsert = tx.prepare_cached(
            "INSERT INTO read_markers (room_no, user_id, seq, sent_total, sent_notes_total,
                                       last_sent_seq)
             VALUES (?1, ?2, 0, ?3, ?4, ?5)
             ON CONFLICT (room_no, user_id) DO UPDATE SET
                 sent_total = sent_total + excluded.sent_total,
                 sent_notes_total = sent_notes_total + excluded.sent_notes_total,
                 last_sent_seq = excluded.last_sent_seq",
        )?;
        for ((room_no, user_id), sent) in self.sent.drain() {
            upsert.execute(params![
                room_no,
                user_id,
                to_i64(sent.messages),
                to_i64(sent.notes),
                to_i64(sent.last_seq),
            ])?;
        }
        Ok(())
    }
}

impl Writer {
    fn run(mut self, requests: &Receiver<WriteRequest>) {
        let mut batch = Vec::with_capacity(self.max_batch.min(4096));
        while let Ok(first) = requests.recv() {
            batch.push(first);
            while batch.len() < self.max_batch {
                match requests.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            let size = batch.len();
            let started = Instant::now();
            let ok = match catch_unwind(AssertUnwindSafe(|| self.commit_batch(&mut batch))) {
                Ok(ok) => ok,
                Err(_) => {
                    // The replies of the batch were dropped while unwinding, so the callers see
                    // the writer as unavailable; the transaction rolled back on drop.
                    tracing::error!(batch_size = size, "sqlite writer panicked during a batch");
                    batch.clear();
                    self.cache.clear();
                    false
                }
            };
            self.metrics
                .commit_seconds
                .observe(started.elapsed().as_secs_f64());
            self.metrics.batch_size.observe(size as f64);
            if !ok {
                self.metrics.commit_failures.inc();
            }
        }
        if let Some((stop, thread)) = self.checkpointer.take() {
            drop(stop);
            let _ = thread.join();
        }
        match self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            Ok(()) => tracing::debug!("sqlite wal checkpointed"),
            Err(error) => tracing::warn!(%error, "sqlite wal checkpoint failed"),
        }
        if let Err((_, error)) = self.conn.close() {
            tracing::warn!(%error, "closing the sqlite write connection failed");
        }
    }

    /// Applies and commits `batch` (left empty), answering every request. Returns whether the
    /// batch committed.
    fn commit_batch(&mut self, batch: &mut Vec<WriteRequest>) -> bool {
        let size = batch.len();
        let mut overlay = Overlay::default();
        let mut applied = Vec::with_capacity(size);
        let mut requests = batch.drain(..);
        let mut committing = false;
        let outcome = (|| -> rusqlite::Result<()> {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            for request in requests.by_ref() {
                let (done, failure) = apply(&tx, &self.cache, &mut overlay, request);
                applied.push(done);
                if let Some(error) = failure {
                    return Err(error);
                }
            }
            overlay.flush_sent(&tx)?;
            overlay.flush_index(&tx)?;
            committing = true;
            tx.commit()
        })();
        match outcome {
            Ok(()) => {
                self.cache.extend(overlay.rooms);
                if self.cache.len() > MAX_CACHED_ROOMS {
                    self.cache.clear();
                }
                for done in applied {
                    done.send();
                }
                tracing::trace!(batch_size = size, "sqlite batch committed");
                true
            }
            Err(error) => {
                // The transaction rolled back when it was dropped (unless COMMIT itself failed
                // half-way). Forget every cached counter: after a failed commit we re-read the
                // truth from the database.
                self.cache.clear();
                tracing::warn!(batch_size = size, committing, %error, "sqlite batch failed");
                for done in applied {
                    done.fail(batch_error(&error, committing));
                }
                for request in requests {
                    request.fail(batch_error(&error, committing));
                }
                false
            }
        }
    }
}

/// The error every request of a failed batch gets. A failure before `COMMIT` applied nothing;
/// one during `COMMIT` (an I/O error while syncing the log) may have left the batch durable.
fn batch_error(error: &rusqlite::Error, committing: bool) -> Error {
    if committing {
        Error::OutcomeUnknown(format!("sqlite commit failed: {error}"))
    } else {
        Error::NotApplied(format!("sqlite write failed: {error}"))
    }
}

/// Applies one request inside the batch transaction. A database error aborts the whole batch
/// (it is returned next to the answer slot); request-level problems are answered in the result.
fn apply(
    tx: &Connection,
    cache: &HashMap<RoomKey, RoomState>,
    overlay: &mut Overlay,
    request: WriteRequest,
) -> (Applied, Option<rusqlite::Error>) {
    fn split<T>(result: rusqlite::Result<Result<T>>) -> (Result<T>, Option<rusqlite::Error>) {
        match result {
            Ok(answer) => (answer, None),
            Err(error) => (Err(Error::NotApplied(error.to_string())), Some(error)),
        }
    }
    match request {
        WriteRequest::Append { message, reply } => {
            let (result, failure) = split(append(tx, cache, overlay, message));
            (Applied::Append(reply, result), failure)
        }
        WriteRequest::CreateRoom { room, reply } => {
            let (result, failure) = split(create_room(tx, cache, overlay, room));
            (Applied::CreateRoom(reply, result), failure)
        }
        WriteRequest::AddParticipant {
            room,
            user_id,
            reply,
        } => {
            let (result, failure) = split(add_participant(tx, cache, overlay, &room, &user_id));
            (Applied::AddParticipant(reply, result), failure)
        }
        WriteRequest::MarkRead {
            room,
            user_id,
            seq,
            reply,
        } => {
            let (result, failure) = split(mark_read(tx, cache, overlay, &room, &user_id, seq));
            (Applied::MarkRead(reply, result), failure)
        }
        WriteRequest::PutRecord { record, reply } => {
            let (result, failure) = split(put_record(tx, overlay, record));
            (Applied::PutRecord(reply, result), failure)
        }
    }
}

const RECORD_SQL: &str = "SELECT version, body, updated_at, list_key FROM records
WHERE tenant_id = ?1 AND kind = ?2 AND id = ?3";

fn read_record(conn: &Connection, key: &RecordKey) -> rusqlite::Result<Option<Record>> {
    conn.prepare_cached(RECORD_SQL)?
        .query_row(params![key.tenant_id, key.kind.as_str(), key.id], |row| {
            Ok(Record {
                key: key.clone(),
                version: to_u64(row.get(0)?),
                body: row.get(1)?,
                updated_at: Timestamp(row.get(2)?),
                list_key: row.get(3)?,
            })
        })
        .optional()
}

/// The page of a list as it was at `query.as_of` (see `SCHEMA_V5_RECORDS`).
fn list_records(
    conn: &Connection,
    tenant_id: &str,
    kind: RecordKind,
    query: &ListQuery,
) -> rusqlite::Result<ListPage> {
    // One read transaction: the clock and the places come from the same snapshot.
    let tx = conn.unchecked_transaction()?;
    let as_of = match query.as_of {
        Some(as_of) => as_of,
        None => Timestamp(
            tx.prepare_cached(CLOCK_SQL)?
                .query_row([], |row| row.get(0))?,
        ),
    };
    let (order, past) = if query.descending {
        ("DESC", "<")
    } else {
        ("ASC", ">")
    };
    let after = if query.after.is_some() {
        format!("AND (l.list_key, l.id) {past} (?4, ?5)")
    } else {
        String::new()
    };
    let sql = format!(
        "SELECT l.list_key, r.id, r.version, r.body, r.updated_at, r.list_key
         FROM record_list l
         JOIN records r ON r.tenant_id = l.tenant_id AND r.kind = l.kind AND r.id = l.id
         WHERE l.tenant_id = ?1 AND l.kind = ?2
           AND l.listed_at <= ?3 AND (l.unlisted_at IS NULL OR l.unlisted_at > ?3) {after}
         ORDER BY l.list_key {order}, l.id {order} LIMIT ?6"
    );
    let (after_key, after_id) = query.after.clone().unwrap_or_default();
    let mut statement = tx.prepare_cached(&sql)?;
    let rows = statement.query_map(
        params![
            tenant_id,
            kind.as_str(),
            as_of.0,
            after_key,
            after_id,
            i64::from(query.limit)
        ],
        |row| {
            let id: String = row.get(1)?;
            Ok(Listed {
                list_key: row.get(0)?,
                record: Record {
                    key: RecordKey::new(tenant_id, kind, &id),
                    version: to_u64(row.get(2)?),
                    body: row.get(3)?,
                    updated_at: Timestamp(row.get(4)?),
                    list_key: row.get(5)?,
                },
            })
        },
    )?;
    let entries = rows.collect::<rusqlite::Result<_>>()?;
    Ok(ListPage { as_of, entries })
}

/// Compare-and-set inside the batch's transaction: earlier writes of the batch are visible.
fn put_record(
    tx: &Connection,
    overlay: &mut Overlay,
    record: Record,
) -> rusqlite::Result<Result<Record>> {
    if record.body.len() > crate::records::MAX_RECORD_BYTES {
        return Ok(Err(Error::Invalid(format!(
            "record body of {} bytes is over the limit of {}",
            record.body.len(),
            crate::records::MAX_RECORD_BYTES
        ))));
    }
    let current = read_record(tx, &record.key)?;
    let stored = current.as_ref().map_or(0, |r| r.version);
    if record.version == 0 || stored != record.version - 1 {
        return Ok(Err(Error::VersionConflict { stored }));
    }
    let key = &record.key;
    tx.prepare_cached(
        "INSERT INTO records (tenant_id, kind, id, version, body, updated_at, list_key)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (tenant_id, kind, id) DO UPDATE
         SET version = excluded.version, body = excluded.body, updated_at = excluded.updated_at,
             list_key = excluded.list_key",
    )?
    .execute(params![
        key.tenant_id,
        key.kind.as_str(),
        key.id,
        to_i64(record.version),
        record.body,
        record.updated_at.0,
        record.list_key
    ])?;
    let was = current.and_then(|r| r.list_key);
    if was != record.list_key {
        move_in_list(tx, overlay, key, was, record.list_key)?;
    }
    Ok(Ok(record))
}

/// Moves a record's place in its list: the old place is kept, closed now, for walks that
/// started before (and places closed long ago are dropped); the new one opens now.
fn move_in_list(
    tx: &Connection,
    overlay: &mut Overlay,
    key: &RecordKey,
    was: Option<i64>,
    now_at: Option<i64>,
) -> rusqlite::Result<()> {
    let now = Timestamp::now().0;
    let stamp = match overlay.list_stamp {
        Some(stamp) => stamp,
        None => {
            let clock: i64 = tx
                .prepare_cached(CLOCK_SQL)?
                .query_row([], |row| row.get(0))?;
            let stamp = now.max(clock + 1);
            tx.prepare_cached("UPDATE list_clock SET stamp = ?1 WHERE id = 0")?
                .execute([stamp])?;
            overlay.list_stamp = Some(stamp);
            stamp
        }
    };
    let kind = key.kind.as_str();
    if let Some(was) = was {
        tx.prepare_cached(
            "UPDATE record_list SET unlisted_at = ?5
             WHERE tenant_id = ?1 AND kind = ?2 AND list_key = ?3 AND id = ?4",
        )?
        .execute(params![key.tenant_id, kind, was, key.id, stamp])?;
        tx.prepare_cached(DROP_CLOSED_PLACES_SQL)?.execute(params![
            key.tenant_id,
            kind,
            key.id,
            now - crate::records::LIST_SNAPSHOT_MILLIS
        ])?;
    }
    if let Some(place) = now_at {
        tx.prepare_cached(
            "INSERT INTO record_list (tenant_id, kind, list_key, id, listed_at, unlisted_at)
             VALUES (?1, ?2, ?3, ?4, ?5, NULL)
             ON CONFLICT (tenant_id, kind, list_key, id) DO UPDATE
             SET listed_at = excluded.listed_at, unlisted_at = NULL",
        )?
        .execute(params![key.tenant_id, kind, place, key.id, stamp])?;
    }
    Ok(())
}

const CLOCK_SQL: &str = "SELECT stamp FROM list_clock WHERE id = 0";

/// Drops a record's places closed before a time (reads only those: [`SCHEMA_V6`]).
const DROP_CLOSED_PLACES_SQL: &str = "DELETE FROM record_list
     WHERE tenant_id = ?1 AND kind = ?2 AND id = ?3 AND unlisted_at < ?4";

/// The room's state as this batch sees it, or `None` when the room does not exist.
fn room_state(
    tx: &Connection,
    cache: &HashMap<RoomKey, RoomState>,
    overlay: &mut Overlay,
    room: &RoomKey,
) -> rusqlite::Result<Option<RoomState>> {
    if let Some(state) = overlay.rooms.get(room) {
        return Ok(Some(*state));
    }
    if let Some(state) = cache.get(room) {
        return Ok(Some(*state));
    }
    let stored = stored_room_state(tx, room)?;
    if let Some(state) = stored {
        overlay.rooms.insert(room.clone(), state);
    }
    Ok(stored)
}

/// A room's `room_no` and counters, from its last message (found through `messages_by_seq`).
const ROOM_STATE_SQL: &str = "
SELECT r.room_no, COALESCE(m.seq, 0), COALESCE(m.notes_upto, 0)
FROM rooms r LEFT JOIN messages m
    ON m.id = (SELECT id FROM messages WHERE room_no = r.room_no ORDER BY seq DESC LIMIT 1)
WHERE r.tenant_id = ?1 AND r.room_id = ?2";

/// The room's state as stored.
fn stored_room_state(conn: &Connection, room: &RoomKey) -> rusqlite::Result<Option<RoomState>> {
    conn.prepare_cached(ROOM_STATE_SQL)?
        .query_row([&room.tenant_id, &room.room_id], |row| {
            Ok(RoomState {
                no: row.get(0)?,
                counters: RoomCounters {
                    last_seq: to_u64(row.get(1)?),
                    note_count: to_u64(row.get(2)?),
                },
            })
        })
        .optional()
}

/// A user's marker row: the marker and the counters kept beside it.
#[derive(Debug, Clone, Copy, Default)]
struct MarkerRow {
    read_seq: u64,
    sent_total: u64,
    sent_notes_total: u64,
    sent_read: u64,
    sent_notes_read: u64,
    last_sent_seq: u64,
    notes_read: u64,
}

impl MarkerRow {
    /// What is unread after the marker, from the room's counters: every message above the
    /// marker, less the user's own, less the notes (for the count without notes; the user's own
    /// notes are already among their own).
    fn state(&self, room: RoomCounters) -> ReadState {
        let above = room.last_seq.saturating_sub(self.read_seq);
        let own_above = self.sent_total.saturating_sub(self.sent_read);
        let own_notes_above = self.sent_notes_total.saturating_sub(self.sent_notes_read);
        let notes_above = room.note_count.saturating_sub(self.notes_read);
        let unread_with_notes = above.saturating_sub(own_above);
        let others_notes_above = notes_above.saturating_sub(own_notes_above);
        ReadState {
            read_seq: self.read_seq,
            unread_with_notes,
            unread: unread_with_notes.saturating_sub(others_notes_above),
        }
    }
}

/// A user's marker row in a room.
const MARKER_SQL: &str = "
SELECT seq, sent_total, sent_notes_total, sent_read, sent_notes_read, last_sent_seq, notes_read
FROM read_markers WHERE room_no = ?1 AND user_id = ?2";

fn marker_row(conn: &Connection, room_no: i64, user_id: &str) -> rusqlite::Result<MarkerRow> {
    let row = conn
        .prepare_cached(MARKER_SQL)?
        .query_row(params![room_no, user_id], |row| {
            Ok(MarkerRow {
                read_seq: to_u64(row.get(0)?),
                sent_total: to_u64(row.get(1)?),
                sent_notes_total: to_u64(row.get(2)?),
                sent_read: to_u64(row.get(3)?),
                sent_notes_read: to_u64(row.get(4)?),
                last_sent_seq: to_u64(row.get(5)?),
                notes_read: to_u64(row.get(6)?),
            })
        })
        .optional()?;
    Ok(row.unwrap_or_default())
}

fn missing_room(room: &RoomKey) -> Error {
    Error::Invalid(format!("room {:?} does not exist", room.room_id))
}

fn append(
    tx: &Connection,
    cache: &HashMap<RoomKey, RoomState>,
    overlay: &mut Overlay,
    message: NewMessage,
) -> rusqlite::Result<Result<Appended>> {
    if message.message_id.is_empty() {
        return Ok(Err(Error::Invalid("empty message_id".to_owned())));
    }
    let room = message.room_key();
    let Some(state) = room_state(tx, cache, overlay, &room)? else {
        return Ok(Err(missing_room(&room)));
    };
    // Earlier requests of the same batch are visible here: they ran in this transaction. The id
    // is checked before the seq, so a retry that comes with a newer seq (after a crash, say) is
    // still answered with the original.
    if let Some(original) = message_in_room(tx, state.no, &room.room_id, &message.message_id)? {
        return Ok(Ok(Appended {
            message: original,
            duplicate: true,
        }));
    }
    let counters = state.counters;
    // The fence: only the room's next seq is stored, so a stale or second writer cannot leave
    // a gap or overwrite.
    if message.seq != counters.last_seq + 1 {
        return Ok(Err(Error::SeqConflict {
            last_seq: counters.last_seq,
        }));
    }
    let Some(key) = index_key(state.no, message.seq) else {
        return Ok(Err(Error::Invalid(format!(
            "seq {} of room {:?} is beyond the search index's keys",
            message.seq, room.room_id
        ))));
    };
    let is_note = message.direction == Direction::Note;
    let notes_upto = counters.note_count + u64::from(is_note);
    tx.prepare_cached(
        "INSERT INTO messages (room_no, seq, message_id, sender, sender_type, direction, type,
                               message, attached_files, reply_to, mentions, metadata,
                               created_at, notes_upto)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )?
    .execute(params![
        state.no,
        to_i64(message.seq),
        message.message_id,
        message.sender,
        message.sender_type.as_str(),
        message.direction.as_str(),
        message.kind.as_str(),
        message.message,
        json_text(&message.attached_files),
        message.reply_to,
        json_text(&message.mentions),
        json_text(&message.metadata),
        message.created_at.0,
        to_i64(notes_upto),
    ])?;
    if let Some(tokens) = index_tokens(is_note, &message.message) {
        overlay.index.push((key, tokens));
    }
    let sent = overlay
        .sent
        .entry((state.no, message.sender.clone()))
        .or_default();
    sent.messages += 1;
    sent.notes += u64::from(is_note);
    sent.last_seq = message.seq;
    overlay.rooms.insert(
        room,
        RoomState {
            no: state.no,
            counters: RoomCounters {
                last_seq: message.seq,
                note_count: notes_upto,
            },
        },
    );
    Ok(Ok(Appended {
        message: message.into_message(),
        duplicate: false,
    }))
}

fn create_room(
    tx: &Connection,
    cache: &HashMap<RoomKey, RoomState>,
    overlay: &mut Overlay,
    room: NewRoom,
) -> rusqlite::Result<Result<(Room, bool)>> {
    if room.room_id.is_empty() {
        return Ok(Err(Error::Invalid("empty room_id".to_owned())));
    }
    let key = room.key();
    if let Some(existing) = room_in_batch(tx, cache, overlay, &key)? {
        return Ok(Ok((existing, false)));
    }
    tx.prepare_cached(
        "INSERT INTO rooms (tenant_id, room_id, kind, title, status, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        room.tenant_id,
        room.room_id,
        room.kind.as_str(),
        room.title,
        room.status,
        room.created_at.0,
    ])?;
    let room_no = tx.last_insert_rowid();
    let mut participants: Vec<String> = Vec::with_capacity(room.participants.len());
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO room_participants (room_no, user_id, position) VALUES (?1, ?2, ?3)",
        )?;
        for user_id in room.participants {
            if participants.contains(&user_id) {
                continue;
            }
            let position = i64::try_from(participants.len()).unwrap_or(i64::MAX);
            insert.execute(params![room_no, user_id, position])?;
            participants.push(user_id);
        }
    }
    overlay.rooms.insert(
        key,
        RoomState {
            no: room_no,
            counters: RoomCounters::default(),
        },
    );
    Ok(Ok((
        Room {
            room_id: room.room_id,
            tenant_id: room.tenant_id,
            kind: room.kind,
            title: room.title,
            status: room.status,
            participants,
            created_at: room.created_at,
            last_seq: 0,
        },
        true,
    )))
}

/// Loads a room inside the batch, with the `last_seq` the batch has assigned so far.
fn room_in_batch(
    tx: &Connection,
    cache: &HashMap<RoomKey, RoomState>,
    overlay: &mut Overlay,
    key: &RoomKey,
) -> rusqlite::Result<Option<Room>> {
    let Some(mut room) = load_room(tx, key)? else {
        return Ok(None);
    };
    if let Some(state) = room_state(tx, cache, overlay, key)? {
        room.last_seq = state.counters.last_seq;
    }
    Ok(Some(room))
}

fn add_participant(
    tx: &Connection,
    cache: &HashMap<RoomKey, RoomState>,
    overlay: &mut Overlay,
    room: &RoomKey,
    user_id: &str,
) -> rusqlite::Result<Result<Room>> {
    let Some(state) = room_state(tx, cache, overlay, room)? else {
        return Ok(Err(missing_room(room)));
    };
    tx.prepare_cached(
        "INSERT OR IGNORE INTO room_participants (room_no, user_id, position)
         SELECT ?1, ?2, COALESCE(MAX(position) + 1, 0) FROM room_participants WHERE room_no = ?1",
    )?
    .execute(params![state.no, user_id])?;
    Ok(room_in_batch(tx, cache, overlay, room)?.ok_or_else(|| missing_room(room)))
}

/// A user's own messages (and notes among them) in a range of a room's seqs.
const OWN_IN_RANGE_SQL: &str = "
SELECT COUNT(*), COALESCE(SUM(direction = 'NOTE'), 0) FROM messages
WHERE room_no = ?1 AND seq > ?2 AND seq <= ?3 AND sender = ?4";

/// The notes of a room up to a seq.
const NOTES_UPTO_SQL: &str = "SELECT notes_upto FROM messages WHERE room_no = ?1 AND seq = ?2";

fn mark_read(
    tx: &Connection,
    cache: &HashMap<RoomKey, RoomState>,
    overlay: &mut Overlay,
    room: &RoomKey,
    user_id: &str,
    seq: u64,
) -> rusqlite::Result<Result<ReadState>> {
    let Some(RoomState { no, counters }) = room_state(tx, cache, overlay, room)? else {
        return Ok(Err(missing_room(room)));
    };
    if seq > counters.last_seq {
        return Ok(Err(Error::Invalid(format!(
            "seq {seq} is beyond the room's last message ({})",
            counters.last_seq
        ))));
    }
    // The marker row must hold what the user sent earlier in this batch.
    overlay.flush_sent(tx)?;
    let mut row = marker_row(tx, no, user_id)?;
    if seq <= row.read_seq {
        return Ok(Ok(row.state(counters)));
    }
    if seq >= row.last_sent_seq {
        row.sent_read = row.sent_total;
        row.sent_notes_read = row.sent_notes_total;
    } else {
        // The marker stops below the user's own latest message: count their messages between
        // the old marker and the new one (a range of the room's index, never the whole room).
        let (own, own_notes): (i64, i64) = tx.prepare_cached(OWN_IN_RANGE_SQL)?.query_row(
            params![no, to_i64(row.read_seq), to_i64(seq), user_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        row.sent_read += to_u64(own);
        row.sent_notes_read += to_u64(own_notes);
    }
    row.notes_read = if seq == counters.last_seq {
        counters.note_count
    } else {
        tx.prepare_cached(NOTES_UPTO_SQL)?
            .query_row(params![no, to_i64(seq)], |r| r.get::<_, i64>(0))
            .optional()?
            .map_or(0, to_u64)
    };
    row.read_seq = seq;
    tx.prepare_cached(
        "INSERT INTO read_markers (room_no, user_id, seq, sent_total, sent_notes_total,
                                   sent_read, sent_notes_read, last_sent_seq, notes_read)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (room_no, user_id) DO UPDATE SET
             seq = excluded.seq, sent_read = excluded.sent_read,
             sent_notes_read = excluded.sent_notes_read, notes_read = excluded.notes_read",
    )?
    .execute(params![
        no,
        user_id,
        to_i64(row.read_seq),
        to_i64(row.sent_total),
        to_i64(row.sent_notes_total),
        to_i64(row.sent_read),
        to_i64(row.sent_notes_read),
        to_i64(row.last_sent_seq),
        to_i64(row.notes_read),
    ])?;
    Ok(Ok(row.state(counters)))
}

fn json_text<T: serde::Serialize>(value: &T) -> String {
    // Serializing string lists and JSON maps cannot fail.
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

// ---------------------------------------------------------------------------------------------
// Readers

fn run_reader(conn: &Connection, jobs: &Receiver<ReadJob>) {
    while let Ok(job) = jobs.recv() {
        if catch_unwind(AssertUnwindSafe(|| job(conn))).is_err() {
            // The reply was dropped while unwinding: the caller sees the store as unavailable.
            tracing::error!("sqlite reader panicked");
            // A panic may have left a read transaction open.
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
        }
    }
}

/// The columns of a message row, in the order [`message_from_row`] reads them (the room's id is
/// not stored with each message: the caller knows it).
const MESSAGE_COLUMNS: &str = "seq, message_id, sender, sender_type, direction, type, message, \
     attached_files, reply_to, mentions, metadata, created_at";
/// How many columns [`MESSAGE_COLUMNS`] names.
const MESSAGE_COLUMN_COUNT: usize = 12;

/// The `room_no` of room `(?1, ?2)`, for the readers (the writer knows it from its cache).
const ROOM_NO: &str = "(SELECT room_no FROM rooms WHERE tenant_id = ?1 AND room_id = ?2)";

fn message_by_id_sql() -> String {
    format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE message_id = ?3 AND room_no = {ROOM_NO}")
}

fn message_by_id(
    conn: &Connection,
    room: &RoomKey,
    message_id: &str,
) -> rusqlite::Result<Option<Message>> {
    conn.prepare_cached(&message_by_id_sql())?
        .query_row([&room.tenant_id, &room.room_id, message_id], |row| {
            message_from_row(row, &room.room_id)
        })
        .optional()
}

fn message_in_room_sql() -> String {
    format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE message_id = ?2 AND room_no = ?1")
}

/// [`message_by_id`] for the writer, which knows the room's `room_no`.
fn message_in_room(
    conn: &Connection,
    room_no: i64,
    room_id: &str,
    message_id: &str,
) -> rusqlite::Result<Option<Message>> {
    conn.prepare_cached(&message_in_room_sql())?
        .query_row(params![room_no, message_id], |row| {
            message_from_row(row, room_id)
        })
        .optional()
}

/// A room and its `last_seq` (that of its last message).
const LOAD_ROOM_SQL: &str = "
SELECT room_no, kind, title, status, created_at,
       COALESCE((SELECT MAX(seq) FROM messages m WHERE m.room_no = r.room_no), 0)
FROM rooms r WHERE tenant_id = ?1 AND room_id = ?2";

const PARTICIPANTS_SQL: &str =
    "SELECT user_id FROM room_participants WHERE room_no = ?1 ORDER BY position";

fn load_room(conn: &Connection, key: &RoomKey) -> rusqlite::Result<Option<Room>> {
    let room = conn
        .prepare_cached(LOAD_ROOM_SQL)?
        .query_row([&key.tenant_id, &key.room_id], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                Room {
                    room_id: key.room_id.clone(),
                    tenant_id: key.tenant_id.clone(),
                    kind: parse_enum(row, 1, RoomKind::parse)?,
                    title: row.get(2)?,
                    status: row.get(3)?,
                    participants: Vec::new(),
                    created_at: Timestamp(row.get(4)?),
                    last_seq: to_u64(row.get(5)?),
                },
            ))
        })
        .optional()?;
    let Some((room_no, mut room)) = room else {
        return Ok(None);
    };
    room.participants = conn
        .prepare_cached(PARTICIPANTS_SQL)?
        .query_map([room_no], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(Some(room))
}

fn message_from_row(row: &Row<'_>, room_id: &str) -> rusqlite::Result<Message> {
    Ok(Message {
        room_id: room_id.to_owned(),
        seq: to_u64(row.get(0)?),
        message_id: row.get(1)?,
        sender: row.get(2)?,
        sender_type: parse_enum(row, 3, SenderType::parse)?,
        direction: parse_enum(row, 4, Direction::parse)?,
        kind: parse_enum(row, 5, MessageType::parse)?,
        message: row.get(6)?,
        attached_files: parse_json(row, 7)?,
        reply_to: row.get(8)?,
        mentions: parse_json(row, 9)?,
        metadata: parse_json(row, 10)?,
        created_at: Timestamp(row.get(11)?),
    })
}

fn parse_enum<T>(row: &Row<'_>, index: usize, parse: fn(&str) -> Option<T>) -> rusqlite::Result<T> {
    let text: String = row.get(index)?;
    parse(&text).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            index,
            Type::Text,
            format!("unknown value {text:?}").into(),
        )
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(row: &Row<'_>, index: usize) -> rusqlite::Result<T> {
    let text: String = row.get(index)?;
    serde_json::from_str(&text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(index, Type::Text, e.into()))
}

/// What one search request may spend.
#[derive(Clone, Copy)]
struct SearchBudget {
    rows: u32,
    time: Duration,
}

/// A search: the index's hits for the query's words in the room, newest first (or oldest first
/// from `after_seq`), each checked against the word rules, at most `budget.rows` of them and
/// `budget.time` per request. A query without words reads like history.
fn search(
    conn: &Connection,
    room: &RoomKey,
    query: &SearchQuery,
    budget: SearchBudget,
) -> rusqlite::Result<HistoryPage> {
    let mut wanted = words(&query.words);
    wanted.sort_unstable();
    wanted.dedup();
    let window = HistoryQuery {
        before_seq: query.before_seq,
        after_seq: query.after_seq,
        limit: query.limit,
        include_notes: query.include_notes,
        max_bytes: query.max_bytes,
    };
    if wanted.is_empty() {
        return read_history(conn, room, &window, budget.rows);
    }
    let Some(room_no) = conn
        .prepare_cached(ROOM_NO_SQL)?
        .query_row([&room.tenant_id, &room.room_id], |row| row.get::<_, i64>(0))
        .optional()?
    else {
        return Ok(HistoryPage::default());
    };
    // SQLite checks in every few thousand steps and stops the statement once the time is
    // spent; the page then ends where the search got to.
    let deadline = Instant::now() + budget.time;
    conn.progress_handler(4_000, Some(move || Instant::now() > deadline));
    let page = search_index(conn, room, room_no, &window, &wanted, budget.rows);
    conn.progress_handler(0, None::<fn() -> bool>);
    page
}

/// The `room_no` of room `(?1, ?2)`.
const ROOM_NO_SQL: &str = "SELECT room_no FROM rooms WHERE tenant_id = ?1 AND room_id = ?2";

/// The index hits of a MATCH expression (`?1`) from key `?3` to key `?4` of room `?2`, with
/// their messages, in key (so seq) order; at most `?5`.
fn search_sql(forwards: bool) -> String {
    format!(
        "SELECT {MESSAGE_COLUMNS} FROM message_words
         JOIN messages ON room_no = ?2 AND seq = message_words.rowid - (?2 << {INDEX_SEQ_BITS})
         WHERE message_words MATCH ?1
           AND message_words.rowid >= ?3 AND message_words.rowid <= ?4
         ORDER BY message_words.rowid {} LIMIT ?5",
        if forwards { "ASC" } else { "DESC" }
    )
}

/// Pages through the index hits of `wanted` (lowercased, deduplicated words) in room
/// `room_no`. Every hit is a message of the room in the window that the reader may see,
/// holding a word with the same indexed prefix as each wanted word; the whole-word check
/// confirms it (it differs only for words longer than [`MAX_INDEXED_WORD`]). At most
/// `hit_budget` hits are examined.
fn search_index(
    conn: &Connection,
    room: &RoomKey,
    room_no: i64,
    query: &HistoryQuery,
    wanted: &[String],
    hit_budget: u32,
) -> rusqlite::Result<HistoryPage> {
    let forwards = query.after_seq.is_some();
    // The window's seqs, `first..end`; a room only has keys for seqs below `1 << INDEX_SEQ_BITS`.
    let first = query.after_seq.map_or(0, |after| after.saturating_add(1));
    let end = query.before_seq.map_or(1 << INDEX_SEQ_BITS, |before| {
        before.min(1 << INDEX_SEQ_BITS)
    });
    if first >= end {
        return Ok(HistoryPage::default());
    }
    let (Some(low), Some(high)) = (index_key(room_no, first), index_key(room_no, end - 1)) else {
        // A room numbered beyond the keys: none of its messages could be stored.
        return Ok(HistoryPage::default());
    };
    let hits_wanted = i64::from(hit_budget.max(1)) + 1;
    let mut statement = conn.prepare_cached(&search_sql(forwards))?;
    let mut rows = statement.query(params![
        match_expression(query.include_notes, wanted),
        room_no,
        low,
        high,
        hits_wanted,
    ])?;
    collect_page(&mut rows, room, query, true, hit_budget, |row| {
        Ok(contains_words(&row.get::<_, String>(6)?, wanted))
    })
}

/// A history read of one room (by tenant and room id), in seq order from an optional lower and
/// upper bound, with `candidate` (whether a row may be shown) as an extra column and a row
/// limit; all parameters are positional.
fn history_sql(candidate: &str, after: bool, before: bool, forwards: bool) -> String {
    let mut sql = format!(
        "SELECT {MESSAGE_COLUMNS}, {candidate} FROM messages WHERE room_no = \
         (SELECT room_no FROM rooms WHERE tenant_id = ? AND room_id = ?)"
    );
    if after {
        sql.push_str(" AND seq > ?");
    }
    if before {
        sql.push_str(" AND seq < ?");
    }
    sql.push_str(if forwards {
        " ORDER BY seq ASC LIMIT ?"
    } else {
        " ORDER BY seq DESC LIMIT ?"
    });
    sql
}

/// Whether a history row may be shown to a reader who may not see notes.
const NOT_A_NOTE: &str = "(direction <> 'NOTE')";

/// Reads a page of the room. Plain history reads `limit + 1` rows. A reader who may not see
/// notes reads the room in seq order, at most `scan_budget` rows (+ 1 to learn whether more
/// follow), with a column telling whether a row is shown; when the budget runs out first, the
/// page says where to continue.
fn read_history(
    conn: &Connection,
    room: &RoomKey,
    query: &HistoryQuery,
    scan_budget: u32,
) -> rusqlite::Result<HistoryPage> {
    let limit = page_limit(query);
    let filtered = !query.include_notes;
    // Forwards from `after_seq` (also when both cursors are given), else backwards from the
    // newest message below `before_seq`.
    let forwards = query.after_seq.is_some();
    let sql = history_sql(
        if filtered { NOT_A_NOTE } else { "1" },
        query.after_seq.is_some(),
        query.before_seq.is_some(),
        forwards,
    );
    let mut args = vec![
        Value::Text(room.tenant_id.clone()),
        Value::Text(room.room_id.clone()),
    ];
    if let Some(after) = query.after_seq {
        args.push(Value::Integer(to_i64(after)));
    }
    if let Some(before) = query.before_seq {
        args.push(Value::Integer(to_i64(before)));
    }
    let rows_wanted = if filtered {
        scan_budget.max(1) as usize + 1
    } else {
        limit + 1
    };
    args.push(Value::Integer(
        i64::try_from(rows_wanted).unwrap_or(i64::MAX),
    ));
    let mut statement = conn.prepare_cached(&sql)?;
    let mut rows = statement.query(rusqlite::params_from_iter(args))?;
    collect_page(&mut rows, room, query, filtered, scan_budget, |row| {
        row.get(MESSAGE_COLUMN_COUNT)
    })
}

/// A query's page size (`limit`, or the default for 0).
fn page_limit(query: &HistoryQuery) -> usize {
    let limit = match query.limit {
        0 => DEFAULT_HISTORY_LIMIT,
        limit => limit,
    };
    limit as usize
}

/// Turns rows of a room (in the order of the page's direction, [`MESSAGE_COLUMNS`] first) into
/// a page. A `filtered` read keeps the rows `keep` accepts, examines at most `budget` rows and,
/// when the budget or the time runs out first, says where to continue; an unfiltered one keeps
/// every row.
fn collect_page(
    rows: &mut rusqlite::Rows<'_>,
    room: &RoomKey,
    query: &HistoryQuery,
    filtered: bool,
    budget: u32,
    mut keep: impl FnMut(&Row<'_>) -> rusqlite::Result<bool>,
) -> rusqlite::Result<HistoryPage> {
    let limit = page_limit(query);
    let mut messages = Vec::with_capacity(limit.min(256) + 1);
    let mut examined = 0u64;
    let mut last_examined = None;
    let mut budget_spent = false;
    let mut bytes = 0usize;
    let mut cut = false;
    loop {
        let row = match rows.next() {
            Ok(Some(row)) => row,
            Ok(None) => break,
            // The search's time ran out: what it found so far, and where to go on from.
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::OperationInterrupted
                    && filtered
                    && last_examined.is_some() =>
            {
                budget_spent = true;
                break;
            }
            Err(e) => return Err(e),
        };
        if filtered {
            if examined == u64::from(budget.max(1)) {
                budget_spent = true;
                break;
            }
            examined += 1;
            last_examined = Some(to_u64(row.get(0)?));
            if !keep(row)? {
                continue;
            }
        } else {
            examined += 1;
        }
        let row_size = row_bytes(row, &room.room_id)?;
        if query.max_bytes > 0
            && !messages.is_empty()
            && messages.len() < limit
            && bytes + row_size > query.max_bytes
        {
            // The byte budget is spent with messages left: stop here, where the next page
            // starts.
            cut = true;
            break;
        }
        bytes += row_size;
        messages.push(message_from_row(row, &room.room_id)?);
        if messages.len() > limit {
            break;
        }
    }
    Ok(ScanOutcome {
        messages,
        limit,
        forwards: query.after_seq.is_some(),
        filtered,
        cut,
        budget_spent,
        examined,
        last_examined,
    }
    .into_page())
}

/// Bytes of text and blobs in a message (its room id and the row as read): what a page holds
/// in memory, roughly.
fn row_bytes(row: &Row<'_>, room_id: &str) -> rusqlite::Result<usize> {
    let mut total = room_id.len();
    for column in 0..MESSAGE_COLUMN_COUNT {
        total += match row.get_ref(column)? {
            rusqlite::types::ValueRef::Text(b) | rusqlite::types::ValueRef::Blob(b) => b.len(),
            _ => 8,
        };
    }
    Ok(total)
}

// ---------------------------------------------------------------------------------------------
// The search index

/// Bits of an index key below the room's number: the seq. Rooms numbered from `1 << 31` on and
/// seqs from `1 << 32` on have no key (their appends are refused): two billion rooms and four
/// billion messages a room, beyond what one SQLite file serves.
const INDEX_SEQ_BITS: u32 = 32;

/// The search index key of message `seq` of room `room_no`: ordered by room, then seq.
fn index_key(room_no: i64, seq: u64) -> Option<i64> {
    let seq = i64::try_from(seq)
        .ok()
        .filter(|seq| *seq < 1 << INDEX_SEQ_BITS)?;
    (0..1 << (63 - INDEX_SEQ_BITS))
        .contains(&room_no)
        .then_some((room_no << INDEX_SEQ_BITS) | seq)
}

/// Starts the tokens of a note's words. Not ASCII (the `ascii` tokenizer keeps it inside the
/// token) and not alphanumeric (no word holds it), so a note's token never equals another
/// message's.
const NOTE_MARK: char = '\u{a6}';

/// Appends the index token of `word` to `out`: the word's first [`MAX_INDEXED_WORD`] bytes,
/// after [`NOTE_MARK`] for a note.
fn push_token(out: &mut String, note: bool, word: &str) {
    let mut end = word.len().min(MAX_INDEXED_WORD);
    while !word.is_char_boundary(end) {
        end -= 1;
    }
    if note {
        out.push(NOTE_MARK);
    }
    out.push_str(&word[..end]);
}

/// What the index holds for a message: the token of each of its distinct words, separated by
/// spaces; `None` when it has no words.
fn index_tokens(note: bool, text: &str) -> Option<String> {
    let mut tokens: Vec<String> = words(text)
        .iter()
        .map(|word| {
            let mut token = String::new();
            push_token(&mut token, note, word);
            token
        })
        .collect();
    if tokens.is_empty() {
        return None;
    }
    tokens.sort_unstable();
    tokens.dedup();
    Some(tokens.join(" "))
}

/// The FTS5 query for messages holding every one of `wanted`: each word's token as an FTS5
/// string (so nothing a user types is read as query syntax), notes' tokens too when the reader
/// may see them.
fn match_expression(include_notes: bool, wanted: &[String]) -> String {
    let mut out = String::new();
    for (i, word) in wanted.iter().enumerate() {
        if i > 0 {
            out.push_str(" AND ");
        }
        if include_notes {
            out.push('(');
            push_fts_string(&mut out, false, word);
            out.push_str(" OR ");
            push_fts_string(&mut out, true, word);
            out.push(')');
        } else {
            push_fts_string(&mut out, false, word);
        }
    }
    out
}

/// A token as an FTS5 string: in double quotes, a double quote doubled (words hold none, but
/// the quoting must not depend on it).
fn push_fts_string(out: &mut String, note: bool, word: &str) {
    let mut token = String::new();
    push_token(&mut token, note, word);
    out.push('"');
    out.push_str(&token.replace('"', "\"\""));
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance_tests;

    async fn fresh_store() -> (SqliteStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SqliteStore::open(&dir.path().join("chat.db"), SqliteConfig::default()).unwrap();
        (store, dir)
    }

    conformance_tests!(fresh_store);

    /// Room `room_id` of tenant `t`, the tenant these tests create their rooms in.
    /// Appends a text message at the room's next seq, as the room's owner would.
    async fn say(
        store: &SqliteStore,
        room: &RoomKey,
        sender: &str,
        text: &str,
    ) -> Result<Appended> {
        let seq = store.room(room).await?.map_or(1, |r| r.last_seq + 1);
        store
            .append(NewMessage::text(room, seq, sender, text))
            .await
    }

    fn key(room_id: &str) -> RoomKey {
        RoomKey::new("t", room_id)
    }

    /// The index's `ascii` tokenizer splits at ASCII characters other than letters and digits;
    /// a word (alphanumeric characters, lowercased) never holds one, so each word is one token.
    #[test]
    fn no_word_holds_an_ascii_separator() {
        for c in (0..=char::MAX as u32).filter_map(char::from_u32) {
            if c.is_alphanumeric() {
                assert!(
                    c.to_lowercase()
                        .all(|l| !l.is_ascii() || l.is_ascii_alphanumeric()),
                    "{c:?}"
                );
            }
        }
        assert!(!NOTE_MARK.is_alphanumeric() && !NOTE_MARK.is_ascii());
    }

    #[test]
    fn index_tokens_are_distinct_bounded_words_marked_for_notes() {
        assert_eq!(
            index_tokens(false, "Hello, hello WORLD!").as_deref(),
            Some("hello world")
        );
        assert_eq!(
            index_tokens(true, "été 1").as_deref(),
            Some("\u{a6}1 \u{a6}été")
        );
        assert_eq!(index_tokens(false, "!?* \"-:"), None);
        // Cut at a character boundary at most MAX_INDEXED_WORD bytes in.
        let long = "é".repeat(40);
        assert_eq!(index_tokens(false, &long), Some("é".repeat(32)));
        assert_eq!(
            match_expression(false, &["a".to_owned(), "b".to_owned()]),
            "\"a\" AND \"b\""
        );
        assert_eq!(
            match_expression(true, &["a".to_owned()]),
            "(\"a\" OR \"\u{a6}a\")"
        );
    }

    #[test]
    fn index_keys_order_by_room_then_seq_and_refuse_what_does_not_fit() {
        assert_eq!(index_key(1, 0), Some(1 << 32));
        assert_eq!(index_key(3, 7), Some((3 << 32) + 7));
        assert!(index_key(1, u64::from(u32::MAX)) < index_key(2, 0));
        assert_eq!(index_key(1, 1 << 32), None);
        assert_eq!(index_key(1 << 31, 1), None);
        assert_eq!(index_key(-1, 1), None);
        assert_eq!(
            index_key((1 << 31) - 1, u64::from(u32::MAX)),
            Some(i64::MAX)
        );
    }

    #[tokio::test]
    async fn search_finds_words_that_only_fold_to_ascii_outside_like() {
        let (store, _dir) = fresh_store().await;
        store
            .create_room(NewRoom::team("r", "t", "alice"))
            .await
            .unwrap();
        say(&store, &key("r"), "alice", "\u{212a}ELVIN scale")
            .await
            .unwrap();
        let page = store
            .search(&key("r"), HistoryQuery::default().search("kelvin"))
            .await
            .unwrap();
        assert_eq!(page.messages.len(), 1);
    }

    #[tokio::test]
    async fn data_survives_close_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/chat.db");
        let store = SqliteStore::open(&path, SqliteConfig::default()).unwrap();
        store
            .create_room(NewRoom::team("r", "t", "alice"))
            .await
            .unwrap();
        store.add_participant(&key("r"), "bob").await.unwrap();
        for i in 0..10 {
            say(&store, &key("r"), "alice", &format!("m{i}"))
                .await
                .unwrap();
        }
        store.mark_read(&key("r"), "bob", 4).await.unwrap();
        store.close().await.unwrap();

        let store = SqliteStore::open(&path, SqliteConfig::default()).unwrap();
        let room = store.room(&key("r")).await.unwrap().unwrap();
        assert_eq!(room.last_seq, 10);
        assert_eq!(room.participants, ["alice", "bob"]);
        assert_eq!(
            store.read_state(&key("r"), "bob").await.unwrap().read_seq,
            4
        );
        let next = say(&store, &key("r"), "alice", "after").await.unwrap();
        assert_eq!(next.message.seq, 11);
        let page = store
            .history(&key("r"), HistoryQuery::default())
            .await
            .unwrap();
        let texts: Vec<_> = page.messages.iter().map(|m| m.message.as_str()).collect();
        assert_eq!(texts[..3], ["m0", "m1", "m2"]);
        assert_eq!(page.messages.len(), 11);
        store.close().await.unwrap();
    }

    #[tokio::test]
    async fn the_log_is_checkpointed_in_the_background_not_by_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.db");
        let store = SqliteStore::open(&path, SqliteConfig::default()).unwrap();
        store
            .create_room(NewRoom::team("r", "t", "alice"))
            .await
            .unwrap();
        let db_size = || std::fs::metadata(&path).unwrap().len();
        let before = db_size();
        let text = "x".repeat(2000);
        for _ in 0..200 {
            say(&store, &key("r"), "alice", &text).await.unwrap();
        }
        // 400 KB of messages went into the log, below the size at which a commit would
        // checkpoint by itself; only the checkpointer copies them into the database file.
        let deadline = Instant::now() + Duration::from_secs(5);
        while db_size() < before + 300_000 {
            assert!(
                Instant::now() < deadline,
                "database file still {} bytes: nothing checkpointed",
                db_size()
            );
            std::thread::sleep(CHECKPOINT_INTERVAL / 2);
        }
        let page = store
            .history(&key("r"), HistoryQuery::default())
            .await
            .unwrap();
        assert_eq!(page.messages.len(), 50);
        store.close().await.unwrap();
    }

    #[test]
    fn schema_version_is_recorded_and_newer_versions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.db");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let store = SqliteStore::open(&path, SqliteConfig::default()).unwrap();
        runtime.block_on(store.close()).unwrap();
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, i64::from(SCHEMA_VERSION));
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |row| row.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let error = SqliteStore::open(&path, SqliteConfig::default()).unwrap_err();
        assert!(matches!(error, Error::Schema(_)), "{error:?}");
    }

    /// After a migration from version `old`: none of its tables is left aside, and every foreign
    /// key holds.
    fn assert_migrated_cleanly(conn: &Connection, old: &str) {
        let leftovers: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_schema WHERE name LIKE '%\\_' || ?1 ESCAPE '\\'",
                [old],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(leftovers, 0, "tables of version {old} are left");
        let violations: i64 = conn
            .query_row("SELECT COUNT(*) FROM pragma_foreign_key_check", [], |row| {
                row.get(0)
            })
            .unwrap();
        assert_eq!(violations, 0);
    }

    /// The version 1 schema, as earlier releases created it: rooms keyed by `room_id` alone.
    const SCHEMA_V1: &str = "
        BEGIN IMMEDIATE;
        CREATE TABLE IF NOT EXISTS rooms (
            room_id    TEXT PRIMARY KEY NOT NULL,
            tenant_id  TEXT NOT NULL,
            kind       TEXT NOT NULL,
            title      TEXT NOT NULL,
            status     TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            last_seq   INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE IF NOT EXISTS room_participants (
            room_id  TEXT NOT NULL REFERENCES rooms (room_id),
            user_id  TEXT NOT NULL,
            position INTEGER NOT NULL,
            PRIMARY KEY (room_id, user_id)
        ) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS messages (
            room_id        TEXT NOT NULL REFERENCES rooms (room_id),
            seq            INTEGER NOT NULL,
            message_id     TEXT NOT NULL,
            sender         TEXT NOT NULL,
            sender_type    TEXT NOT NULL,
            direction      TEXT NOT NULL,
            type           TEXT NOT NULL,
            message        TEXT NOT NULL,
            attached_files TEXT NOT NULL,
            reply_to       TEXT,
            mentions       TEXT NOT NULL,
            metadata       TEXT NOT NULL,
            created_at     INTEGER NOT NULL,
            PRIMARY KEY (room_id, seq)
        ) WITHOUT ROWID;
        CREATE UNIQUE INDEX IF NOT EXISTS messages_by_id ON messages (room_id, message_id);
        CREATE TABLE IF NOT EXISTS read_markers (
            room_id TEXT NOT NULL REFERENCES rooms (room_id),
            user_id TEXT NOT NULL,
            seq     INTEGER NOT NULL,
            PRIMARY KEY (room_id, user_id)
        ) WITHOUT ROWID;
        PRAGMA user_version = 1;
        COMMIT;
    ";

    #[tokio::test]
    async fn version_1_data_is_migrated_under_each_rooms_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(SCHEMA_V1).unwrap();
        old.execute_batch(
            r#"
            INSERT INTO rooms VALUES ('general', 'acme', 'team', 'General', 'active', 5, 3);
            INSERT INTO rooms VALUES ('conv-1', 'globex', 'support', 'Order', 'open', 6, 2);
            INSERT INTO room_participants VALUES ('general', 'alice', 0), ('general', 'bob', 1);
            INSERT INTO room_participants VALUES ('conv-1', 'agent-7', 0);
            INSERT INTO messages VALUES
                ('general', 1, 'g1', 'alice', 'user', 'INTERNAL', 'text', 'hello', '[]', NULL,
                 '[]', '{}', 10),
                ('general', 2, 'g2', 'bob', 'user', 'INTERNAL', 'text', 'hi alice', '["f.png"]',
                 'g1', '["alice"]', '{"k":1}', 11),
                ('general', 3, 'g3', 'alice', 'user', 'NOTE', 'text', 'note', '[]', NULL,
                 '[]', '{}', 12),
                ('conv-1', 1, 'c1', 'cust', 'customer', 'INCOMING', 'text', 'help', '[]', NULL,
                 '[]', '{}', 20),
                ('conv-1', 2, 'c2', 'agent-7', 'agent', 'OUTGOING', 'text', 'sure', '[]', NULL,
                 '[]', '{}', 21);
            INSERT INTO read_markers VALUES ('general', 'bob', 2), ('conv-1', 'agent-7', 1);
            "#,
        )
        .unwrap();
        drop(old);

        let store = SqliteStore::open(&path, SqliteConfig::default()).unwrap();
        let general = RoomKey::new("acme", "general");
        let conv = RoomKey::new("globex", "conv-1");
        let room = store.room(&general).await.unwrap().unwrap();
        assert_eq!(room.tenant_id, "acme");
        assert_eq!(room.title, "General");
        assert_eq!(room.participants, ["alice", "bob"]);
        assert_eq!(room.last_seq, 3);
        assert_eq!(room.created_at, Timestamp(5));
        let room = store.room(&conv).await.unwrap().unwrap();
        assert_eq!((room.kind, room.last_seq), (RoomKind::Support, 2));
        assert_eq!(room.participants, ["agent-7"]);
        // Nothing moved to another tenant.
        assert!(store
            .room(&RoomKey::new("globex", "general"))
            .await
            .unwrap()
            .is_none());
        assert!(store
            .room(&RoomKey::new("acme", "conv-1"))
            .await
            .unwrap()
            .is_none());

        let all = HistoryQuery {
            include_notes: true,
            ..HistoryQuery::default()
        };
        let page = store.history(&general, all.clone()).await.unwrap();
        let got: Vec<_> = page
            .messages
            .iter()
            .map(|m| (m.seq, m.message_id.as_str()))
            .collect();
        assert_eq!(got, [(1, "g1"), (2, "g2"), (3, "g3")]);
        let second = &page.messages[1];
        assert_eq!(second.attached_files, ["f.png"]);
        assert_eq!(second.reply_to.as_deref(), Some("g1"));
        assert_eq!(second.mentions, ["alice"]);
        assert_eq!(second.metadata["k"], 1);
        assert_eq!(second.created_at, Timestamp(11));
        assert_eq!(page.messages[2].direction, Direction::Note);
        let page = store.history(&conv, all).await.unwrap();
        let got: Vec<_> = page
            .messages
            .iter()
            .map(|m| m.message_id.as_str())
            .collect();
        assert_eq!(got, ["c1", "c2"]);
        assert_eq!(page.messages[0].sender_type, SenderType::Customer);

        // The counters of version 3 are computed from the migrated rows.
        let bob = store.read_state(&general, "bob").await.unwrap();
        assert_eq!((bob.read_seq, bob.unread, bob.unread_with_notes), (2, 0, 1));
        let agent = store.read_state(&conv, "agent-7").await.unwrap();
        assert_eq!((agent.read_seq, agent.unread_with_notes), (1, 0));

        // Appends continue at the right seq, and old ids still deduplicate.
        let next = say(&store, &general, "alice", "after").await.unwrap();
        assert_eq!(next.message.seq, 4);
        let mut again = NewMessage::text(&conv, 3, "agent-7", "retry");
        again.message_id = "c2".to_owned();
        let again = store.append(again).await.unwrap();
        assert!(again.duplicate);
        assert_eq!(again.message.seq, 2);
        let next = say(&store, &conv, "agent-7", "later").await.unwrap();
        assert_eq!(next.message.seq, 3);
        store.close().await.unwrap();

        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, i64::from(SCHEMA_VERSION));
        assert_migrated_cleanly(&conn, "v1");
    }

    #[tokio::test]
    async fn version_2_data_is_rebuilt_in_append_order_with_its_counters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(&format!("BEGIN IMMEDIATE; {SCHEMA_V2} COMMIT;"))
            .unwrap();
        old.execute_batch(
            r#"
            INSERT INTO rooms VALUES ('acme', 'general', 'team', 'General', 'active', 5, 4);
            INSERT INTO rooms VALUES ('globex', 'general', 'support', 'Other', 'open', 6, 1);
            INSERT INTO rooms VALUES ('acme', 'empty', 'team', 'Empty', 'active', 7, 0);
            INSERT INTO room_participants VALUES
                ('acme', 'general', 'alice', 0), ('acme', 'general', 'bob', 1),
                ('acme', 'general', 'carol', 2), ('globex', 'general', 'agent-7', 0);
            INSERT INTO messages VALUES
                ('acme', 'general', 1, 'g1', 'alice', 'user', 'INTERNAL', 'text', 'hello', '[]',
                 NULL, '[]', '{}', 10),
                ('acme', 'general', 2, 'g2', 'bob', 'user', 'INTERNAL', 'text', 'hi alice',
                 '["f.png"]', 'g1', '["alice"]', '{"k":1}', 11),
                ('acme', 'general', 3, 'g3', 'alice', 'user', 'NOTE', 'text', 'note', '[]',
                 NULL, '[]', '{}', 12),
                ('acme', 'general', 4, 'g4', 'carol', 'user', 'INTERNAL', 'text', 'hey', '[]',
                 NULL, '[]', '{}', 13),
                ('globex', 'general', 1, 'g3', 'cust', 'customer', 'INCOMING', 'text', 'help',
                 '[]', NULL, '[]', '{}', 20);
            INSERT INTO read_markers VALUES
                ('acme', 'general', 'bob', 2), ('acme', 'general', 'alice', 1);
            "#,
        )
        .unwrap();
        drop(old);

        let store = SqliteStore::open(&path, SqliteConfig::default()).unwrap();
        let general = RoomKey::new("acme", "general");
        let other = RoomKey::new("globex", "general");
        let room = store.room(&general).await.unwrap().unwrap();
        assert_eq!((room.title.as_str(), room.last_seq), ("General", 4));
        assert_eq!(room.participants, ["alice", "bob", "carol"]);
        assert_eq!(room.created_at, Timestamp(5));
        let room = store.room(&other).await.unwrap().unwrap();
        assert_eq!((room.kind, room.last_seq), (RoomKind::Support, 1));
        assert_eq!(room.participants, ["agent-7"]);
        let empty = RoomKey::new("acme", "empty");
        assert_eq!(store.room(&empty).await.unwrap().unwrap().last_seq, 0);

        let all = HistoryQuery {
            include_notes: true,
            ..HistoryQuery::default()
        };
        let page = store.history(&general, all.clone()).await.unwrap();
        let got: Vec<_> = page
            .messages
            .iter()
            .map(|m| (m.seq, m.message_id.as_str(), m.sender.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (1, "g1", "alice"),
                (2, "g2", "bob"),
                (3, "g3", "alice"),
                (4, "g4", "carol")
            ]
        );
        let second = &page.messages[1];
        assert_eq!(second.room_id, "general");
        assert_eq!(second.attached_files, ["f.png"]);
        assert_eq!(second.reply_to.as_deref(), Some("g1"));
        assert_eq!(second.mentions, ["alice"]);
        assert_eq!(second.metadata["k"], 1);
        assert_eq!(page.messages[2].direction, Direction::Note);
        let page = store.history(&other, all).await.unwrap();
        assert_eq!(page.messages.len(), 1);
        assert_eq!(page.messages[0].sender_type, SenderType::Customer);
        // The same id in another tenant's room is another message.
        let note = store.message_by_id(&general, "g3").await.unwrap().unwrap();
        assert_eq!((note.seq, note.direction), (3, Direction::Note));
        let help = store.message_by_id(&other, "g3").await.unwrap().unwrap();
        assert_eq!(help.message, "help");
        // The step to version 4 indexed the rebuilt messages.
        let found = store
            .search(&general, HistoryQuery::default().search("ALICE"))
            .await
            .unwrap();
        let found: Vec<_> = found.messages.iter().map(|m| m.seq).collect();
        assert_eq!(found, [2]);

        // The counters: bob read up to 2 (then a note of alice's and carol's message); alice
        // read up to 1 (then bob's, her own note, carol's); carol sent 4 and has no marker; dave
        // never read nor sent.
        let unread = |state: ReadState| (state.read_seq, state.unread, state.unread_with_notes);
        let state = |user: &'static str| store.read_state(&general, user);
        assert_eq!(unread(state("bob").await.unwrap()), (2, 1, 2));
        assert_eq!(unread(state("alice").await.unwrap()), (1, 2, 2));
        assert_eq!(unread(state("carol").await.unwrap()), (0, 2, 3));
        assert_eq!(unread(state("dave").await.unwrap()), (0, 3, 4));
        let cust = store.read_state(&other, "cust").await.unwrap();
        assert_eq!(unread(cust), (0, 0, 0));
        // A marker below the user's own last message counts from the migrated rows.
        let alice = store.mark_read(&general, "alice", 3).await.unwrap();
        assert_eq!(unread(alice), (3, 1, 1));

        // Appends continue at the right seq, the fence holds and old ids still deduplicate.
        let next = say(&store, &general, "bob", "after").await.unwrap();
        assert_eq!(next.message.seq, 5);
        let stale = store
            .append(NewMessage::text(&general, 7, "bob", "gap"))
            .await
            .unwrap_err();
        assert!(
            matches!(stale, Error::SeqConflict { last_seq: 5 }),
            "{stale:?}"
        );
        let mut again = NewMessage::text(&general, 6, "bob", "retry");
        again.message_id = "g2".to_owned();
        let again = store.append(again).await.unwrap();
        assert!(again.duplicate);
        assert_eq!(again.message.seq, 2);
        let bob = store.mark_read(&general, "bob", 5).await.unwrap();
        assert_eq!(unread(bob), (5, 0, 0));
        store.close().await.unwrap();

        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, i64::from(SCHEMA_VERSION));
        let notes: Vec<(i64, i64)> = conn
            .prepare(
                "SELECT seq, notes_upto FROM messages
                 WHERE room_no = (SELECT room_no FROM rooms
                                  WHERE tenant_id = 'acme' AND room_id = 'general')
                 ORDER BY seq",
            )
            .unwrap()
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(notes, [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1)]);
        assert_migrated_cleanly(&conn, "v2");
        let integrity: String = conn
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .unwrap();
        assert_eq!(integrity, "ok");
    }

    /// Every read and write of one room's data is an index search (no scan of a table, no
    /// sort of messages), whether it starts from the room's key (readers) or its `room_no` (the writer).
    #[test]
    fn every_room_query_is_an_index_search() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.db");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let store = SqliteStore::open(&path, SqliteConfig::default()).unwrap();
        runtime.block_on(store.close()).unwrap();
        let conn = Connection::open(&path).unwrap();
        let mut queries: Vec<(String, &str)> = vec![
            (ROOM_STATE_SQL.to_owned(), "messages_by_seq"),
            (LOAD_ROOM_SQL.to_owned(), "messages_by_seq"),
            (PARTICIPANTS_SQL.to_owned(), "PRIMARY KEY"),
            (MARKER_SQL.to_owned(), "PRIMARY KEY"),
            (OWN_IN_RANGE_SQL.to_owned(), "messages_by_seq"),
            (NOTES_UPTO_SQL.to_owned(), "messages_by_seq"),
            (message_by_id_sql(), "messages_by_id"),
            (message_in_room_sql(), "messages_by_id"),
            (ROOM_NO_SQL.to_owned(), "(tenant_id=? AND room_id=?)"),
            (
                DROP_CLOSED_PLACES_SQL.to_owned(),
                "record_list_closed (tenant_id=? AND kind=? AND id=? AND unlisted_at<?)",
            ),
        ];
        for forwards in [false, true] {
            queries.push((search_sql(forwards), "messages_by_seq"));
        }
        for candidate in ["1", NOT_A_NOTE] {
            for (after, before, forwards) in [
                (false, false, false),
                (false, true, false),
                (true, false, true),
                (true, true, true),
            ] {
                queries.push((
                    history_sql(candidate, after, before, forwards),
                    "messages_by_seq",
                ));
            }
        }
        for (sql, index) in queries {
            let mut explain = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let unbound = vec![Value::Null; explain.parameter_count()];
            let plan: Vec<String> = explain
                .query_map(rusqlite::params_from_iter(unbound), |row| {
                    row.get::<_, String>(3)
                })
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            eprintln!("{}\n    {}", sql.trim(), plan.join("\n    "));
            // A room's participants are sorted by position (a few rows, as in version 2).
            let sort_ok = sql.contains("FROM room_participants");
            // A search reads the postings of its tokens in a rowid range (`M` the MATCH, `<`
            // and `>` the bounds), in rowid order; every message it joins is one probe.
            let index_lookup = |step: &String| {
                step.strip_prefix("SCAN message_words VIRTUAL TABLE INDEX ")
                    .and_then(|index| index.split_once(':'))
                    .is_some_and(|(_, how)| ["M", "<", ">"].iter().all(|c| how.contains(c)))
            };
            let bad = plan.iter().any(|step| {
                (step.starts_with("SCAN") && !index_lookup(step))
                    || (!sort_ok && step.contains("TEMP B-TREE"))
            });
            assert!(!bad, "{sql}\n{plan:#?}");
            assert!(
                plan.iter().any(|step| step.contains(index)),
                "{sql}\n{plan:#?}"
            );
            assert!(
                plan.iter().any(|step| step.starts_with("SEARCH")),
                "{sql}\n{plan:#?}"
            );
        }
    }

    /// Creates room `room_id` of tenant `t` holding `count` messages, "filler text {seq}" except
    /// `special` ones, written straight into the database and its search index in one
    /// transaction (appending them one by one would take minutes in a debug build).
    async fn big_room(
        store: &SqliteStore,
        path: &Path,
        room_id: &str,
        count: u64,
        special: &[(u64, &str)],
    ) {
        big_room_of(store, path, room_id, count, "filler text ", special).await;
    }

    /// [`big_room`] with messages "{filler}{seq}".
    async fn big_room_of(
        store: &SqliteStore,
        path: &Path,
        room_id: &str,
        count: u64,
        filler: &str,
        special: &[(u64, &str)],
    ) {
        store
            .create_room(NewRoom::team(room_id, "t", "alice"))
            .await
            .unwrap();
        let mut conn = Connection::open(path).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        let tx = conn.transaction().unwrap();
        let first: i64 = tx
            .query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM messages", [], |row| {
                row.get(0)
            })
            .unwrap();
        tx.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?2)
             INSERT INTO messages (room_no, seq, message_id, sender, sender_type, direction,
                                   type, message, attached_files, reply_to, mentions, metadata,
                                   created_at, notes_upto)
             SELECT (SELECT room_no FROM rooms WHERE tenant_id = 't' AND room_id = ?1), i,
                    'id-' || i, 'alice', 'user', 'INTERNAL', 'text', ?3 || i, '[]',
                    NULL, '[]', '{}', i, 0 FROM n",
            params![room_id, to_i64(count), filler],
        )
        .unwrap();
        for (seq, text) in special {
            tx.execute(
                "UPDATE messages SET message = ?3
                 WHERE room_no = (SELECT room_no FROM rooms WHERE tenant_id = 't' AND room_id = ?1)
                   AND seq = ?2",
                params![room_id, to_i64(*seq), text],
            )
            .unwrap();
        }
        index_messages(&tx, first).unwrap();
        tx.commit().unwrap();
    }

    fn search_query(words: &str, after_seq: Option<u64>, before_seq: Option<u64>) -> SearchQuery {
        SearchQuery {
            words: words.to_owned(),
            after_seq,
            before_seq,
            limit: 10,
            include_notes: false,
            max_bytes: 0,
        }
    }

    /// The index finds a rare word anywhere in a large room in one request: no cursor, and only
    /// the hits are read (a scan with the default budget would have needed 5 requests).
    #[tokio::test]
    async fn a_rare_word_deep_in_a_large_room_is_found_in_one_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.db");
        let store = SqliteStore::open(&path, SqliteConfig::default()).unwrap();
        let count = 50_000;
        assert!(count > 4 * u64::from(crate::DEFAULT_SCAN_ROWS));
        let rare = [(5, "a rare Zebra"), (45_000, "zebra again")];
        big_room(&store, &path, "big", count, &rare).await;
        store
            .create_room(NewRoom::team("small", "t", "bob"))
            .await
            .unwrap();
        say(&store, &key("small"), "bob", "filler too")
            .await
            .unwrap();
        let find = |words: &str, after: Option<u64>, before: Option<u64>| {
            let store = store.clone();
            let query = search_query(words, after, before);
            async move { store.search(&key("big"), query).await.unwrap() }
        };

        for page in [
            find("zebra", None, None).await,
            find("ZEBRA", Some(0), None).await,
        ] {
            assert_eq!(seqs(&page), [5, 45_000]);
            assert!(!page.has_more);
            assert_eq!((page.next_before_seq, page.next_after_seq), (None, None));
            assert_eq!(page.examined, 2);
        }
        assert_eq!(seqs(&find("zebra", None, Some(45_000)).await), [5]);
        assert_eq!(seqs(&find("zebra", Some(5), None).await), [45_000]);
        assert!(find("zebra", Some(5), Some(45_000))
            .await
            .messages
            .is_empty());
        assert_eq!(seqs(&find("rare zebra", None, None).await), [5]);
        let none = find("zebra filler", None, None).await;
        assert!(none.messages.is_empty() && !none.has_more);

        // A common word fills the page from the newest hits and pages as before.
        let page = find("filler", None, None).await;
        assert_eq!(seqs(&page), (count - 9..=count).collect::<Vec<_>>());
        assert!(page.has_more);
        assert_eq!((page.next_before_seq, page.next_after_seq), (None, None));
        assert_eq!(page.examined, 11);

        // The big room's postings are not read by a search of another room.
        let small = store
            .search(&key("small"), search_query("filler", None, None))
            .await
            .unwrap();
        assert_eq!((seqs(&small), small.examined), (vec![1], 1));
        store.close().await.unwrap();
    }

    fn seqs(page: &HistoryPage) -> Vec<u64> {
        page.messages.iter().map(|m| m.seq).collect()
    }

    /// A search examines at most `search_scan_rows` index hits, then answers with a cursor.
    #[tokio::test]
    async fn search_examines_at_most_its_budget_and_hands_back_a_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.db");
        let config = SqliteConfig {
            search_scan_rows: 4,
            ..SqliteConfig::default()
        };
        let store = SqliteStore::open(&path, config).unwrap();
        big_room(&store, &path, "r", 30, &[]).await;

        let page = store
            .search(&key("r"), search_query("filler", None, None))
            .await
            .unwrap();
        assert_eq!(seqs(&page), [27, 28, 29, 30]);
        assert!(page.has_more);
        assert_eq!(page.examined, 4);
        assert_eq!(
            (page.next_before_seq, page.next_after_seq),
            (Some(27), None)
        );

        let mut found = seqs(&page);
        let mut cursor = page.next_before_seq;
        let mut requests = 1;
        while let Some(before) = cursor {
            let page = store
                .search(&key("r"), search_query("filler", None, Some(before)))
                .await
                .unwrap();
            requests += 1;
            assert!(page.examined <= 4, "{}", page.examined);
            assert_eq!(page.has_more, page.next_before_seq.is_some());
            found.extend(seqs(&page));
            cursor = page.next_before_seq;
        }
        found.sort_unstable();
        assert_eq!(found, (1..=30).collect::<Vec<_>>());
        assert_eq!(requests, 8);

        let page = store
            .search(&key("r"), search_query("FILLER", Some(0), None))
            .await
            .unwrap();
        assert_eq!(seqs(&page), [1, 2, 3, 4]);
        assert_eq!((page.next_before_seq, page.next_after_seq), (None, Some(4)));
        store.close().await.unwrap();
    }

    /// Notes are indexed apart: a reader who may not see them never examines one.
    #[tokio::test]
    async fn hidden_notes_cost_a_search_nothing() {
        let (store, _dir) = fresh_store().await;
        store
            .create_room(NewRoom::team("r", "t", "alice"))
            .await
            .unwrap();
        say(&store, &key("r"), "alice", "the secret plan")
            .await
            .unwrap();
        for seq in 2..=41 {
            let mut note = NewMessage::text(&key("r"), seq, "alice", "secret note");
            note.direction = Direction::Note;
            store.append(note).await.unwrap();
        }
        let mut query = search_query("secret", None, None);
        query.limit = 100;
        let page = store.search(&key("r"), query.clone()).await.unwrap();
        assert_eq!((seqs(&page), page.examined), (vec![1], 1));
        query.include_notes = true;
        let page = store.search(&key("r"), query).await.unwrap();
        assert_eq!(seqs(&page), (1..=41).collect::<Vec<_>>());
        assert_eq!(page.examined, 41);
        store.close().await.unwrap();
    }

    /// Cursors anywhere in the seq range, up to `u64::MAX`, bound a search as they bound history.
    #[tokio::test]
    async fn search_windows_reach_the_ends_of_the_seq_range() {
        let (store, _dir) = fresh_store().await;
        store
            .create_room(NewRoom::team("r", "t", "alice"))
            .await
            .unwrap();
        for _ in 0..3 {
            say(&store, &key("r"), "alice", "word").await.unwrap();
        }
        let max = u64::MAX;
        for (after, before, expected) in [
            (None, None, vec![1, 2, 3]),
            (None, Some(max), vec![1, 2, 3]),
            (Some(0), Some(max), vec![1, 2, 3]),
            (Some(2), None, vec![3]),
            (None, Some(2), vec![1]),
            (Some(1), Some(3), vec![2]),
            (Some(1), Some(2), vec![]),
            (Some(3), None, vec![]),
            (Some(max), None, vec![]),
            (Some(max - 1), Some(max), vec![]),
            (None, Some(1), vec![]),
            (None, Some(0), vec![]),
        ] {
            let page = store
                .search(&key("r"), search_query("WORD", after, before))
                .await
                .unwrap();
            assert_eq!(seqs(&page), expected, "after {after:?} before {before:?}");
            assert!(!page.has_more);
        }
        store.close().await.unwrap();
    }

    /// A seq past the index's keys is refused before anything is written.
    #[tokio::test]
    async fn an_append_beyond_the_index_keys_is_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.db");
        let store = SqliteStore::open(&path, SqliteConfig::default()).unwrap();
        let last = (1u64 << INDEX_SEQ_BITS) - 1;
        big_room(&store, &path, "r", 1, &[]).await;
        store.close().await.unwrap();
        let conn = Connection::open(&path).unwrap();
        conn.execute("UPDATE messages SET seq = ?1", [to_i64(last)])
            .unwrap();
        drop(conn);
        let store = SqliteStore::open(&path, SqliteConfig::default()).unwrap();
        let error = store
            .append(NewMessage::text(
                &key("r"),
                last + 1,
                "alice",
                "one too many",
            ))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, Error::Invalid(m) if m.contains("search index")),
            "{error:?}"
        );
        assert_eq!(store.room(&key("r")).await.unwrap().unwrap().last_seq, last);
        store.close().await.unwrap();
    }

    /// Whatever a user types is read as words by the word rules, never as FTS5 query syntax:
    /// no input fails, and every answer is what the rules say over the room's messages.
    #[tokio::test]
    async fn search_reads_every_query_as_words_never_as_fts5_syntax() {
        let (store, _dir) = fresh_store().await;
        store
            .create_room(NewRoom::team("r", "t", "alice"))
            .await
            .unwrap();
        let long = "x".repeat(70);
        let texts = [
            ("near the end", false),
            ("hello world", false),
            ("and or not", false),
            ("col: value", false),
            ("a\"b", false),
            ("say \"hello\" * -world", false),
            ("ÇA VA", false),
            ("İstanbul", false),
            ("\u{212a}elvin", false),
            (&format!("{long}a"), false),
            (&format!("{long}b"), false),
            ("hello secret", true),
            ("", false),
            ("!!!", false),
        ];
        for (seq, (text, note)) in (1..).zip(texts) {
            let mut message = NewMessage::text(&key("r"), seq, "alice", text);
            if note {
                message.direction = Direction::Note;
            }
            store.append(message).await.unwrap();
        }
        let queries = [
            "\"",
            "\"\"",
            "*",
            "hello*",
            "*hello",
            "NEAR",
            "NEAR(hello world)",
            "near/3",
            "NEAR(\"hello\" \"world\", 2)",
            "-",
            "-hello",
            "hello -world",
            ":",
            "col:value",
            "words:hello",
            "message_words:hello",
            "{words}: hello",
            "AND",
            "OR",
            "NOT",
            "hello AND",
            "hello OR world",
            "hello NOT world",
            "(",
            ")",
            "(hello",
            "^hello",
            "+",
            "hello + world",
            "a\"b",
            "\"hello world\"",
            "'",
            "\\",
            "\0",
            "hello\0world",
            "rank:x",
            "İSTANBUL",
            "i\u{307}stanbul",
            "istanbul",
            "kelvin",
            "ça",
            "ca",
            &format!("{long}a"),
            &format!("{long}c"),
            &"x".repeat(64),
            "7\u{b7}hello",
            "\u{b7}",
            "\u{a6}secret",
            "secret",
        ];
        for words_typed in queries {
            for include_notes in [false, true] {
                let query = SearchQuery {
                    words: words_typed.to_owned(),
                    limit: 100,
                    include_notes,
                    ..SearchQuery::default()
                };
                let page = store
                    .search(&key("r"), query)
                    .await
                    .unwrap_or_else(|e| panic!("{words_typed:?}: {e}"));
                let wanted = words(words_typed);
                let expected: Vec<u64> = (1..)
                    .zip(texts)
                    .filter(|(_, (text, note))| {
                        (include_notes || !note) && contains_words(text, &wanted)
                    })
                    .map(|(seq, _)| seq)
                    .collect();
                assert_eq!(seqs(&page), expected, "{words_typed:?} {include_notes}");
            }
        }
        store.close().await.unwrap();
    }

    /// A version 3 database (no search index) gets one built from its messages when it opens.
    #[tokio::test]
    async fn version_3_messages_are_indexed_for_search() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(&format!("BEGIN IMMEDIATE; {SCHEMA_V3} COMMIT;"))
            .unwrap();
        old.execute_batch(
            r#"
            INSERT INTO rooms VALUES (1, 'acme', 'general', 'team', 'General', 'active', 5);
            INSERT INTO rooms VALUES (2, 'globex', 'general', 'support', 'Other', 'open', 6);
            INSERT INTO room_participants VALUES (1, 'alice', 0), (2, 'agent-7', 0);
            INSERT INTO messages (room_no, seq, message_id, sender, sender_type, direction, type,
                                  message, attached_files, reply_to, mentions, metadata,
                                  created_at, notes_upto) VALUES
                (1, 1, 'g1', 'alice', 'user', 'INTERNAL', 'text', 'Hello world', '[]', NULL,
                 '[]', '{}', 10, 0),
                (2, 1, 'o1', 'cust', 'customer', 'INCOMING', 'text', 'hello?', '[]', NULL,
                 '[]', '{}', 11, 0),
                (1, 2, 'g2', 'alice', 'user', 'NOTE', 'text', 'hello from a note', '[]', NULL,
                 '[]', '{}', 12, 1),
                (1, 3, 'g3', 'bob', 'user', 'INTERNAL', 'text', '???', '[]', NULL,
                 '[]', '{}', 13, 1),
                (1, 4, 'g4', 'bob', 'user', 'INTERNAL', 'text', 'Straße, hello', '[]', NULL,
                 '[]', '{}', 14, 1);
            INSERT INTO read_markers (room_no, user_id, seq, sent_total, last_sent_seq)
                VALUES (1, 'alice', 0, 2, 2), (1, 'bob', 0, 2, 4);
            "#,
        )
        .unwrap();
        drop(old);

        let store = SqliteStore::open(&path, SqliteConfig::default()).unwrap();
        let general = RoomKey::new("acme", "general");
        let other = RoomKey::new("globex", "general");
        let find = |room: &RoomKey, words: &str, include_notes: bool| {
            let (store, room) = (store.clone(), room.clone());
            let query = SearchQuery {
                words: words.to_owned(),
                include_notes,
                ..SearchQuery::default()
            };
            async move { seqs(&store.search(&room, query).await.unwrap()) }
        };
        assert_eq!(find(&general, "HELLO", false).await, [1, 4]);
        assert_eq!(find(&general, "hello", true).await, [1, 2, 4]);
        assert_eq!(find(&general, "straße hello", false).await, [4]);
        assert_eq!(find(&other, "hello", false).await, [1]);
        assert_eq!(store.room(&general).await.unwrap().unwrap().last_seq, 4);
        // New messages are indexed as they are appended.
        say(&store, &general, "alice", "hello again").await.unwrap();
        assert_eq!(find(&general, "hello", false).await, [1, 4, 5]);
        assert_eq!(find(&general, "again", false).await, [5]);
        store.close().await.unwrap();

        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, i64::from(SCHEMA_VERSION));
        conn.execute(
            "INSERT INTO message_words (message_words) VALUES ('integrity-check')",
            [],
        )
        .unwrap();
        let integrity: String = conn
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .unwrap();
        assert_eq!(integrity, "ok");
        // Every message has its entry under its room and seq, notes apart.
        let keys = |token: &str| -> Vec<i64> {
            conn.prepare("SELECT rowid FROM message_words WHERE message_words MATCH ?1")
                .unwrap()
                .query_map([format!("\"{token}\"")], |row| row.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
        };
        let key = |room_no, seq| index_key(room_no, seq).unwrap();
        assert_eq!(keys("hello"), [key(1, 1), key(1, 4), key(1, 5), key(2, 1)]);
        assert_eq!(keys("\u{a6}hello"), [key(1, 2)]);
    }

    /// The slowest search the index allows: every hit shares the indexed prefix of a long query
    /// word and fails the whole-word check, so a search examines every message of the room.
    const LONG_WORD_MISS: usize = MAX_INDEXED_WORD + 7;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn room_loads_do_not_wait_behind_slow_searches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.db");
        let config = SqliteConfig {
            readers: 1,
            lookup_readers: 1,
            // Each search reads the whole room.
            search_scan_rows: 1_000_000,
            search_time: Duration::from_secs(600),
            ..SqliteConfig::default()
        };
        let store = SqliteStore::open(&path, config).unwrap();
        let filler = format!("{} ", "x".repeat(LONG_WORD_MISS - 1));
        big_room_of(&store, &path, "big", 100_000, &filler, &[]).await;
        store
            .create_room(NewRoom::team("small", "t", "bob"))
            .await
            .unwrap();
        let searches: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                let miss = "x".repeat(LONG_WORD_MISS);
                tokio::spawn(async move {
                    store
                        .search(&key("big"), search_query(&miss, None, None))
                        .await
                        .unwrap()
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = Instant::now();
        let room = store.room(&key("small")).await.unwrap().unwrap();
        let waited = started.elapsed();
        let done = searches.iter().filter(|s| s.is_finished()).count();
        assert_eq!(room.participants, ["bob"]);
        assert!(
            done < searches.len(),
            "the room load waited {waited:?}, until every search had finished"
        );
        for search in searches {
            let page = search.await.unwrap();
            assert!(page.messages.is_empty() && !page.has_more);
            assert_eq!(page.examined, 100_000);
        }
        store.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_search_stops_at_its_time_budget_and_hands_back_a_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.db");
        let config = SqliteConfig {
            search_scan_rows: 1_000_000,
            search_time: Duration::from_millis(20),
            ..SqliteConfig::default()
        };
        let store = SqliteStore::open(&path, config).unwrap();
        let filler = format!("{} ", "x".repeat(LONG_WORD_MISS - 1));
        big_room_of(&store, &path, "big", 100_000, &filler, &[]).await;
        let started = Instant::now();
        let page = store
            .search(
                &key("big"),
                search_query(&"x".repeat(LONG_WORD_MISS), None, None),
            )
            .await
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(page.has_more);
        assert!(
            page.examined > 0 && page.examined < 100_000,
            "{}",
            page.examined
        );
        // The cursor continues below the last hit read.
        assert_eq!(page.next_before_seq, Some(100_001 - page.examined));
        store.close().await.unwrap();
    }

    #[test]
    fn futures_work_on_a_current_thread_runtime_on_another_thread() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SqliteStore::open(&dir.path().join("chat.db"), SqliteConfig::default()).unwrap();
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap();
                    runtime.block_on(async {
                        let room = format!("room-{i}");
                        store
                            .create_room(NewRoom::team(&room, "t", "alice"))
                            .await
                            .unwrap();
                        for n in 1..=20 {
                            let appended = say(&store, &key(&room), "alice", "hi").await.unwrap();
                            assert_eq!(appended.message.seq, n);
                        }
                        store
                            .history(&key(&room), HistoryQuery::default())
                            .await
                            .unwrap()
                    })
                })
            })
            .collect();
        for handle in handles {
            assert_eq!(handle.join().unwrap().messages.len(), 20);
        }
    }

    /// Holds the database write lock from another connection so the writer stalls on
    /// `BEGIN IMMEDIATE` and the requests queued meanwhile form one batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn failed_batch_applies_nothing_and_later_writes_continue_gap_free() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.db");
        let store = SqliteStore::open(&path, SqliteConfig::default()).unwrap();
        store
            .create_room(NewRoom::team("r", "t", "alice"))
            .await
            .unwrap();
        for text in ["one", "two"] {
            say(&store, &key("r"), "alice", text).await.unwrap();
        }

        // Another connection takes the write lock and, inside it, installs a trigger that makes
        // the insert of "boom" fail the way a full disk would: at the transaction level.
        let blocker = Connection::open(&path).unwrap();
        blocker
            .execute_batch(
                "BEGIN IMMEDIATE;
                 CREATE TRIGGER boom BEFORE INSERT ON messages WHEN NEW.message = 'boom'
                 BEGIN SELECT RAISE(ABORT, 'simulated write failure'); END;",
            )
            .unwrap();
        // Queued in call order, as the room's owner pipelines them.
        let spawn = |seq: u64, text: &str| {
            tokio::spawn(store.append(NewMessage::text(&key("r"), seq, "alice", text)))
        };
        // The writer takes "stall" alone and blocks on the lock; the next three queue up behind
        // it and are committed together.
        let stall = spawn(3, "stall");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let batch = [spawn(4, "x"), spawn(5, "boom"), spawn(6, "y")];
        tokio::time::sleep(Duration::from_millis(200)).await;
        blocker.execute_batch("COMMIT").unwrap();

        assert_eq!(stall.await.unwrap().unwrap().message.seq, 3);
        for handle in batch {
            let error = handle.await.unwrap().unwrap_err();
            assert!(matches!(error, Error::NotApplied(_)), "{error:?}");
        }
        let after = say(&store, &key("r"), "alice", "after").await.unwrap();
        assert_eq!(after.message.seq, 4);
        let page = store
            .history(&key("r"), HistoryQuery::default())
            .await
            .unwrap();
        let texts: Vec<_> = page.messages.iter().map(|m| m.message.as_str()).collect();
        assert_eq!(texts, ["one", "two", "stall", "after"]);
        assert_eq!(store.room(&key("r")).await.unwrap().unwrap().last_seq, 4);

        assert_eq!(store.inner.metrics.commit_failures.get(), 1);
        store.close().await.unwrap();
    }

    /// Holds the write lock from another connection while 500 appends queue up, so they are
    /// certainly waiting together when the writer gets the lock back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn writer_metrics_see_grouped_batches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.db");
        let config = SqliteConfig {
            busy_timeout: Duration::from_secs(10),
            ..SqliteConfig::default()
        };
        let store = SqliteStore::open(&path, config).unwrap();
        store
            .create_room(NewRoom::team("r", "t", "alice"))
            .await
            .unwrap();
        let blocker = Connection::open(&path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let metrics = store.inner.metrics.clone();
        let tasks: Vec<_> = (1..=500)
            .map(|seq| tokio::spawn(store.append(NewMessage::text(&key("r"), seq, "alice", "m"))))
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            metrics.batch_size.get_sample_sum(),
            1.0,
            "only the room is committed"
        );
        blocker.execute_batch("COMMIT").unwrap();
        let mut seqs: Vec<u64> = Vec::new();
        for task in tasks {
            seqs.push(task.await.unwrap().unwrap().message.seq);
        }
        store.close().await.unwrap();
        assert_eq!(seqs, (1..=500).collect::<Vec<_>>());
        assert_eq!(metrics.batch_size.get_sample_sum(), 501.0);
        assert_eq!(metrics.commit_failures.get(), 0);
        // The room's batch, the append the writer took before it stalled, and the rest
        // together (max_batch is 1024).
        let batches = metrics.batch_size.get_sample_count();
        assert!(batches <= 3, "{batches} batches for 501 writes");
    }

    #[tokio::test]
    async fn full_write_queue_fails_fast() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.db");
        let config = SqliteConfig {
            queue_capacity: 2,
            busy_timeout: Duration::from_secs(10),
            ..SqliteConfig::default()
        };
        let store = SqliteStore::open(&path, config).unwrap();
        store
            .create_room(NewRoom::team("r", "t", "alice"))
            .await
            .unwrap();
        let blocker = Connection::open(&path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let mut pending = Vec::new();
        let mut full = None;
        for seq in 1..=10 {
            let handle = tokio::spawn(store.append(NewMessage::text(&key("r"), seq, "alice", "m")));
            tokio::time::sleep(Duration::from_millis(20)).await;
            if handle.is_finished() {
                full = Some(handle.await.unwrap().unwrap_err());
                break;
            }
            pending.push(handle);
        }
        blocker.execute_batch("COMMIT").unwrap();
        let full = full.expect("the queue never filled");
        assert!(
            matches!(&full, Error::NotApplied(m) if m.contains("queue full")),
            "{full:?}"
        );
        for handle in pending {
            handle.await.unwrap().unwrap();
        }
        store.close().await.unwrap();
    }

    #[test]
    fn a_failed_commit_is_an_unknown_outcome_and_a_failed_statement_is_not() {
        let io = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR_FSYNC),
            None,
        );
        let error = batch_error(&io, true);
        assert!(matches!(&error, Error::OutcomeUnknown(m) if m.contains("commit failed")));
        assert!(error.is_retryable());
        let error = batch_error(&io, false);
        assert!(matches!(error, Error::NotApplied(_)), "{error:?}");
    }

    #[test]
    fn default_write_queue_holds_at_most_eight_batches() {
        let config = SqliteConfig::default();
        assert!(config.queue_capacity <= 8 * config.max_batch);
        assert!(config.queue_capacity >= config.max_batch);
    }

    #[test]
    fn url_parameters_tune_the_backend_and_unknown_ones_are_refused() {
        let options = Options {
            scan_rows: 77,
            ..Options::default()
        };
        let config =
            SqliteConfig::from_params(vec![("max_batch", "64"), ("readers", "2")], &options)
                .unwrap();
        assert_eq!((config.max_batch, config.readers), (64, 2));
        assert_eq!(config.search_scan_rows, 77);
        let error = SqliteConfig::from_params(vec![("max_btach", "64")], &options).unwrap_err();
        assert!(
            matches!(&error, Error::BadUrl(m) if m.contains("max_btach")),
            "{error:?}"
        );
        let error = SqliteConfig::from_params(vec![("readers", "many")], &options).unwrap_err();
        assert!(matches!(error, Error::BadUrl(_)), "{error:?}");
    }
}
