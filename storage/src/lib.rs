//! Durable storage for the conversation gateway: the domain records (messages, rooms, read
//! markers), the [`Store`] trait every backend implements, and the backends themselves.
//!
//! # Layout
//!
//! - [`model`]: the records as they are stored and as they appear on the wire.
//! - [`Store`]: the backend contract. Room-partitioned, seq-ordered, idempotent on
//!   `(tenant, room_id, message_id)`; every room is named by a [`RoomKey`] (tenant + id), since
//!   room ids are unique within a tenant only. The same shape fits the embedded engine and a
//!   wide-column store partitioned by `(tenant, room_id, bucket)`.
//! - [`sqlite`]: the embedded default (SQLite in WAL mode, `synchronous=FULL`, one group-commit
//!   writer thread, a small pool of reader connections).
//! - [`cql`] (feature `scylla`): ScyllaDB / Cassandra over CQL, messages partitioned by
//!   `(tenant, room_id, bucket)`, schema applied by [`migrate`].
//! - [`AnyStore`]: enum dispatch over the compiled-in backends, chosen by the scheme of a URL
//!   by [`open`] (backend tuning travels in the URL's parameters).
//! - [`timeout`]: [`TimeoutStore`], a deadline on every call of any [`Store`].
//! - [`metered`]: [`MeteredStore`], latency and outcome metrics of every call of any [`Store`].
//! - `conformance` (feature `conformance`): the behaviour suite every backend must pass.
//!
//! # Example
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use storage::{open, NewMessage, NewRoom, RoomKey, Store};
//! let dir = tempfile::tempdir().unwrap();
//! let store = open(&format!("sqlite://{}", dir.path().join("chat.db").display())).unwrap();
//! let (created, _) = store.create_room(NewRoom::team("room-1", "acme", "alice")).await.unwrap();
//! let room = RoomKey::new("acme", "room-1");
//! // The room's owner keeps the seq counter, starting from the stored `last_seq`.
//! let next = created.last_seq + 1;
//! let appended = store.append(NewMessage::text(&room, next, "alice", "hello")).await.unwrap();
//! assert_eq!(appended.message.seq, 1);
//! assert!(!appended.duplicate);
//! # });
//! ```

// Without a backend `AnyStore` has no variants and its methods ignore their arguments.
#![cfg_attr(
    not(any(feature = "sqlite", feature = "scylla")),
    allow(unused_variables)
)]

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
#[cfg(feature = "scylla")]
pub mod cql;
pub mod metered;
#[macro_use]
pub mod model;
pub mod records;
#[cfg(feature = "sqlite")]
pub mod sqlite;
pub mod timeout;
#[cfg(any(feature = "sqlite", feature = "scylla"))]
mod words;

use std::future::Future;
use std::time::Duration;

pub use metered::MeteredStore;
pub use model::{
    Appended, Direction, HistoryPage, HistoryQuery, Message, MessageType, NewMessage, NewRoom,
    ReadState, Room, RoomKey, RoomKind, SearchQuery, SenderType, Timestamp,
};
pub use records::{Record, RecordKey, RecordKind};
pub use timeout::TimeoutStore;

/// Result type of every storage operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in a storage operation. Every failure of a write says which of three things
/// happened to it: it was **not applied** ([`Error::NotApplied`], [`Error::SeqConflict`],
/// [`Error::Closed`]), it was **invalid** ([`Error::Invalid`]; also not applied), or its
/// **outcome is unknown** ([`Error::OutcomeUnknown`]: a timeout after the request left).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The backend cannot take writes or answer reads right now (disk full, I/O error, node
    /// down, overloaded, a full queue). Nothing of the failed operation was applied; retrying
    /// may succeed.
    #[error("storage unavailable: {0}")]
    NotApplied(String),
    /// An append named a `seq` that is not the room's next one (another message has it, or the
    /// one before it is not stored). Nothing was applied; `last_seq` is the room's highest
    /// stored seq, from which the owner renumbers.
    #[error("seq conflict: the room's last stored seq is {last_seq}")]
    SeqConflict { last_seq: u64 },
    /// The request is invalid for this backend (for example a room that does not exist).
    /// Nothing was applied.
    #[error("invalid storage request: {0}")]
    Invalid(String),
    /// The store URL could not be understood.
    #[error("bad store url: {0}")]
    BadUrl(String),
    /// The database schema is missing or older than this build needs (see `gateway migrate`).
    #[error("storage schema: {0}")]
    Schema(String),
    /// The store is shutting down and takes no more requests.
    #[error("storage closed")]
    Closed,
    /// A write whose outcome is not known: its commit failed after its statements ran (an I/O
    /// error while making it durable), a replica did not answer in time, or the caller stopped
    /// waiting for it. It may or may not be durable. Retrying with the same ids is safe:
    /// appends are idempotent on the message id (a retry returns the original if it was
    /// stored) and the other writes are idempotent.
    #[error("storage write outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// A record write named a version the record no longer has (someone else wrote it since it
    /// was read, or it exists already / does not exist yet). Nothing was applied; `stored` is
    /// the version there now (0: none), from which the writer reads again.
    #[error("version conflict: the stored version is {stored}")]
    VersionConflict { stored: u64 },
}

impl Error {
    /// Whether retrying the same request later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::NotApplied(_)
                | Error::Closed
                | Error::OutcomeUnknown(_)
                | Error::SeqConflict { .. }
        )
    }

    /// A short stable name of the kind, for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NotApplied(_) => "not_applied",
            Error::SeqConflict { .. } => "seq_conflict",
            Error::Invalid(_) => "invalid",
            Error::BadUrl(_) => "bad_url",
            Error::Schema(_) => "schema",
            Error::Closed => "closed",
            Error::OutcomeUnknown(_) => "outcome_unknown",
            Error::VersionConflict { .. } => "version_conflict",
        }
    }
}

/// The storage contract shared by every backend.
///
/// Messages are partitioned by room and ordered by `seq`. The room's owner (the shard that
/// holds the room; one owner per room at a time) assigns `seq`: it recovers the counter from
/// [`Room::last_seq`] when it loads the room and passes the seq it chose with every append. The
/// store keeps a cheap fence instead of sequencing: an append is applied only when its seq is
/// the room's next one (`last_seq + 1`), so stored messages start at 1 and never leave a gap,
/// and a second writer with a stale counter gets [`Error::SeqConflict`] rather than
/// overwriting. Appends are idempotent on `(room, message_id)`. A returned future resolves
/// only once the write is durable (at the configured consistency).
///
/// Every room is named by a [`RoomKey`]: room ids are unique within a tenant only, and a room of
/// another tenant behaves exactly like one that does not exist.
pub trait Store: Send + Sync + 'static {
    /// Stores `message` at `message.seq`. The request is queued when this is called, not when
    /// the future is first polled: appends to one room are applied in the order of the calls,
    /// so an owner can pipeline seq N+1 behind seq N.
    ///
    /// If the room already holds a message with the same `message_id`, nothing is written, the
    /// original is returned with `duplicate = true`, and the seq passed is left unused. A seq
    /// other than the room's next one is refused with [`Error::SeqConflict`]. The room must
    /// exist.
    fn append(
        &self,
        message: NewMessage,
    ) -> impl Future<Output = Result<Appended>> + Send + 'static;

    /// Creates the room (keyed by its tenant and id) if it does not exist; returns the stored
    /// room either way (`true` when this call created it). A room with the same id in another
    /// tenant is another room and is never affected.
    fn create_room(&self, room: NewRoom) -> impl Future<Output = Result<(Room, bool)>> + Send;

    /// Looks a room up by key, with its `last_seq` (the owner's counter at load).
    fn room(&self, room: &RoomKey) -> impl Future<Output = Result<Option<Room>>> + Send;

    /// Adds a participant to a room (no-op when already present); returns the updated room.
    fn add_participant(
        &self,
        room: &RoomKey,
        user_id: &str,
    ) -> impl Future<Output = Result<Room>> + Send;

    /// Reads messages of one room, oldest first, as described by the query. A reader who may
    /// not see notes never makes the store read an unbounded run of them: the read examines at
    /// most a budget of rows and hands back a cursor, as a search does.
    fn history(
        &self,
        room: &RoomKey,
        query: HistoryQuery,
    ) -> impl Future<Output = Result<HistoryPage>> + Send;

    /// Finds the messages of one room holding every word of the query (whole words, case
    /// insensitive), paging like [`Store::history`]. Each request costs at most a bounded
    /// amount of work: a backend without a full-text index (CQL) examines at most its row
    /// budget, one with an index (SQLite) at most that many of the index's hits, and answers
    /// with a continuation cursor ([`HistoryPage::next_before_seq`] /
    /// [`HistoryPage::next_after_seq`]) when it stopped there.
    fn search(
        &self,
        room: &RoomKey,
        query: SearchQuery,
    ) -> impl Future<Output = Result<HistoryPage>> + Send;

    /// Looks one message up by its id.
    fn message_by_id(
        &self,
        room: &RoomKey,
        message_id: &str,
    ) -> impl Future<Output = Result<Option<Message>>> + Send;

    /// Moves the user's read marker in the room to `seq` unless it is already further; returns
    /// the marker now stored and what is left unread after it.
    fn mark_read(
        &self,
        room: &RoomKey,
        user_id: &str,
        seq: u64,
    ) -> impl Future<Output = Result<ReadState>> + Send;

    /// The user's read marker in the room (0 when the user never read anything) and unread
    /// counts, from maintained counters (no count over the room's messages).
    fn read_state(
        &self,
        room: &RoomKey,
        user_id: &str,
    ) -> impl Future<Output = Result<ReadState>> + Send;

    /// Reads one record (contacts, inboxes, conversations: see [`records`]).
    fn record(&self, key: &RecordKey) -> impl Future<Output = Result<Option<Record>>> + Send;

    /// Writes `record` if the stored version is `record.version - 1` (0: no record with this
    /// key exists), atomically; otherwise writes nothing and fails with
    /// [`Error::VersionConflict`]. Returns the record as stored. A body over
    /// [`records::MAX_RECORD_BYTES`] is [`Error::Invalid`].
    fn put_record(&self, record: Record) -> impl Future<Output = Result<Record>> + Send;

    /// A page of the tenant's records of `kind` that have a [`Record::list_key`], ordered by
    /// `(list_key, id)` as the list was at `query.as_of` (see [`records::ListQuery`]), each
    /// with its current body. Places a record left are kept for
    /// [`records::LIST_SNAPSHOT_MILLIS`]: a walk over pages must end within that time.
    fn list_records(
        &self,
        tenant_id: &str,
        kind: RecordKind,
        query: records::ListQuery,
    ) -> impl Future<Output = Result<records::ListPage>> + Send;

    /// Waits until everything accepted so far is durable, then stops taking writes.
    fn close(&self) -> impl Future<Output = Result<()>> + Send;
}

/// Backend-neutral options for [`open`]; what is specific to one backend comes in its URL.
#[derive(Debug, Clone)]
pub struct Options {
    /// Most rows of a room one search (or one history read that skips notes) examines before
    /// it answers with what it found and a continuation cursor: rows of a scan, or, on a
    /// backend with a full-text index (SQLite), the index's hits.
    pub scan_rows: u32,
    /// Longest one search may run before it answers the same way.
    pub scan_time: Duration,
    /// Credentials of a database server, when its URL names none (`user=`, `password=`): kept
    /// out of the URL so that they need not appear in a process list or a log line.
    pub user: Option<String>,
    pub password: Option<String>,
    /// PEM file of the CA certificates a database server's certificate must chain to (for
    /// `scylla://`: implies TLS, as `tls=true` does, which otherwise trusts the usual public
    /// roots).
    pub tls_ca: Option<std::path::PathBuf>,
    /// PEM files of a client certificate (with its chain) and its private key, for servers that
    /// ask for one (mutual TLS); both or neither. They imply TLS.
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            scan_rows: DEFAULT_SCAN_ROWS,
            scan_time: DEFAULT_SCAN_TIME,
            user: None,
            password: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// Default of [`Options::scan_rows`].
pub const DEFAULT_SCAN_ROWS: u32 = 10_000;
/// Default of [`Options::scan_time`].
pub const DEFAULT_SCAN_TIME: Duration = Duration::from_millis(100);

/// Every compiled-in backend behind one type, so the gateway needs no generics.
#[derive(Clone)]
#[non_exhaustive]
pub enum AnyStore {
    /// The embedded SQLite backend.
    #[cfg(feature = "sqlite")]
    Sqlite(sqlite::SqliteStore),
    /// The ScyllaDB / Cassandra backend.
    #[cfg(feature = "scylla")]
    Cql(cql::CqlStore),
}

/// Opens a store from a URL with default [`Options`]: `sqlite://<path>` (the path may be
/// relative, e.g. `sqlite://./data/gateway.db`) or
/// `scylla://host1:9042,host2:9042/keyspace?dc=dc1&consistency=local_quorum` (see [`cql`]).
pub fn open(url: &str) -> Result<AnyStore> {
    open_with(url, &Options::default())
}

/// Opens a store from a URL, with `options`.
pub fn open_with(url: &str, options: &Options) -> Result<AnyStore> {
    match split_url(url)? {
        #[cfg(feature = "sqlite")]
        ("sqlite", rest) => {
            let (path, params) = split_params(rest);
            let config = sqlite::SqliteConfig::from_params(params, options)?;
            Ok(AnyStore::Sqlite(sqlite::SqliteStore::open(
                std::path::Path::new(path),
                config,
            )?))
        }
        #[cfg(feature = "scylla")]
        ("scylla", _) => Ok(AnyStore::Cql(cql::CqlStore::open(url, options)?)),
        (other, _) => Err(unsupported_scheme(other)),
    }
}

/// Creates the store's schema or brings it to the version this build needs; returns that
/// version. The embedded store migrates itself when it opens, so for it this opens and closes
/// the database; a database server's schema is changed only here (the gateway refuses to start
/// on an older one, naming `gateway migrate`).
pub async fn migrate(url: &str, options: &Options) -> Result<u32> {
    match split_url(url)? {
        #[cfg(feature = "sqlite")]
        ("sqlite", _) => {
            let store = open_with(url, options)?;
            store.close().await?;
            Ok(sqlite::SCHEMA_VERSION)
        }
        #[cfg(feature = "scylla")]
        ("scylla", _) => cql::migrate(url, options).await,
        (other, _) => Err(unsupported_scheme(other)),
    }
}

fn split_url(url: &str) -> Result<(&str, &str)> {
    url.split_once("://")
        .ok_or_else(|| Error::BadUrl(format!("{url:?} has no scheme")))
}

/// Splits `rest?k=v&k2=v2` into the part before `?` and its parameters.
#[cfg_attr(not(any(feature = "sqlite", feature = "scylla")), allow(dead_code))]
fn split_params(rest: &str) -> (&str, Vec<(&str, &str)>) {
    match rest.split_once('?') {
        None => (rest, Vec::new()),
        Some((head, query)) => (
            head,
            query
                .split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
                .collect(),
        ),
    }
}

/// Parses one URL parameter's value.
#[cfg_attr(not(any(feature = "sqlite", feature = "scylla")), allow(dead_code))]
fn param<T: std::str::FromStr>(name: &str, value: &str) -> Result<T> {
    value
        .parse()
        .map_err(|_| Error::BadUrl(format!("parameter {name}={value:?} is not valid")))
}

fn unsupported_scheme(scheme: &str) -> Error {
    let compiled: &[&str] = &[
        #[cfg(feature = "sqlite")]
        "sqlite",
        #[cfg(feature = "scylla")]
        "scylla",
    ];
    Error::BadUrl(format!(
        "unsupported store scheme {scheme:?} (compiled in: {})",
        compiled.join(", ")
    ))
}

macro_rules! dispatch {
    ($self:ident, $store:ident => $call:expr) => {
        match *$self {
            #[cfg(feature = "sqlite")]
            AnyStore::Sqlite(ref $store) => $call,
            #[cfg(feature = "scylla")]
            AnyStore::Cql(ref $store) => $call,
        }
    };
}

impl AnyStore {
    /// The backend's own metrics (group commits, batch sizes), for the caller's registry.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        dispatch!(self, s => s.collectors())
    }
}

impl Store for AnyStore {
    fn append(
        &self,
        message: NewMessage,
    ) -> impl Future<Output = Result<Appended>> + Send + 'static {
        let pending: std::pin::Pin<Box<dyn Future<Output = Result<Appended>> + Send>> =
            dispatch!(self, s => Box::pin(s.append(message)));
        pending
    }
    async fn create_room(&self, room: NewRoom) -> Result<(Room, bool)> {
        dispatch!(self, s => s.create_room(room).await)
    }
    async fn room(&self, room: &RoomKey) -> Result<Option<Room>> {
        dispatch!(self, s => s.room(room).await)
    }
    async fn add_participant(&self, room: &RoomKey, user_id: &str) -> Result<Room> {
        dispatch!(self, s => s.add_participant(room, user_id).await)
    }
    async fn history(&self, room: &RoomKey, query: HistoryQuery) -> Result<HistoryPage> {
        dispatch!(self, s => s.history(room, query).await)
    }
    async fn search(&self, room: &RoomKey, query: SearchQuery) -> Result<HistoryPage> {
        dispatch!(self, s => s.search(room, query).await)
    }
    async fn message_by_id(&self, room: &RoomKey, message_id: &str) -> Result<Option<Message>> {
        dispatch!(self, s => s.message_by_id(room, message_id).await)
    }
    async fn mark_read(&self, room: &RoomKey, user_id: &str, seq: u64) -> Result<ReadState> {
        dispatch!(self, s => s.mark_read(room, user_id, seq).await)
    }
    async fn read_state(&self, room: &RoomKey, user_id: &str) -> Result<ReadState> {
        dispatch!(self, s => s.read_state(room, user_id).await)
    }
    async fn record(&self, key: &RecordKey) -> Result<Option<Record>> {
        dispatch!(self, s => s.record(key).await)
    }
    async fn put_record(&self, record: Record) -> Result<Record> {
        dispatch!(self, s => s.put_record(record).await)
    }
    async fn list_records(
        &self,
        tenant_id: &str,
        kind: RecordKind,
        query: records::ListQuery,
    ) -> Result<records::ListPage> {
        dispatch!(self, s => s.list_records(tenant_id, kind, query).await)
    }
    async fn close(&self) -> Result<()> {
        dispatch!(self, s => s.close().await)
    }
}
