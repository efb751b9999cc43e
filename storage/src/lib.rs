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
//! - [`AnyStore`]: enum dispatch over the compiled-in backends, built from a URL by [`open`]
//!   (or [`open_with`] to tune the embedded backend).
//! - [`timeout`]: [`TimeoutStore`], a deadline on every call of any [`Store`].
//! - `conformance` (feature `conformance`): the behaviour suite every backend must pass.
//!
//! # Example
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use storage::{open, NewMessage, NewRoom, RoomKey, Store};
//! let dir = tempfile::tempdir().unwrap();
//! let store = open(&format!("sqlite://{}", dir.path().join("chat.db").display())).unwrap();
//! store.create_room(NewRoom::team("room-1", "acme", "alice")).await.unwrap();
//! let room = RoomKey::new("acme", "room-1");
//! let appended = store.append(NewMessage::text(&room, "alice", "hello")).await.unwrap();
//! assert_eq!(appended.message.seq, 1);
//! assert!(!appended.duplicate);
//! # });
//! ```

// Without a backend `AnyStore` has no variants and its methods ignore their arguments.
#![cfg_attr(not(feature = "sqlite"), allow(unused_variables))]

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod model;
#[cfg(feature = "sqlite")]
pub mod sqlite;
pub mod timeout;

use std::future::Future;
use std::time::Duration;

pub use model::{
    Appended, Direction, HistoryPage, HistoryQuery, Message, MessageType, NewMessage, NewRoom,
    Room, RoomKey, RoomKind, SenderType, Timestamp,
};
pub use timeout::TimeoutStore;

/// Result type of every storage operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong in a storage operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The backend cannot take writes or answer reads right now (disk full, I/O error, the
    /// writer is gone). Nothing of the failed operation was applied; retrying may succeed.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The request is invalid for this backend (for example a room that does not exist).
    #[error("invalid storage request: {0}")]
    Invalid(String),
    /// The store URL could not be understood.
    #[error("bad store url: {0}")]
    BadUrl(String),
    /// The store is shutting down and takes no more requests.
    #[error("storage closed")]
    Closed,
    /// A write whose outcome is not known: its commit failed after its statements ran (an I/O
    /// error while making it durable), or the caller stopped waiting for it. It may or may not
    /// be durable. Retrying with the same ids is safe: appends are idempotent on the message
    /// id (a retry returns the original if it was stored) and the other writes are idempotent.
    #[error("storage write outcome unknown: {0}")]
    OutcomeUnknown(String),
}

impl Error {
    /// Whether retrying the same request later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Unavailable(_) | Error::Closed | Error::OutcomeUnknown(_)
        )
    }
}

/// The storage contract shared by every backend.
///
/// Messages are partitioned by room and ordered by `seq`, which the store assigns: per room it
/// starts at 1 and grows by exactly one for every stored message, so stored messages never leave
/// a gap. Appends are idempotent on `(room, message_id)`. A returned future resolves only
/// once the write is durable.
///
/// Every room is named by a [`RoomKey`]: room ids are unique within a tenant only, and a room of
/// another tenant behaves exactly like one that does not exist.
pub trait Store: Send + Sync + 'static {
    /// Stores a message, assigning its `seq`. If the room already holds a message with the same
    /// `message_id`, nothing is written and the original is returned with `duplicate = true`.
    /// The room must exist.
    fn append(&self, message: NewMessage) -> impl Future<Output = Result<Appended>> + Send;

    /// Creates the room (keyed by its tenant and id) if it does not exist; returns the stored
    /// room either way (`true` when this call created it). A room with the same id in another
    /// tenant is another room and is never affected.
    fn create_room(&self, room: NewRoom) -> impl Future<Output = Result<(Room, bool)>> + Send;

    /// Looks a room up by key.
    fn room(&self, room: &RoomKey) -> impl Future<Output = Result<Option<Room>>> + Send;

    /// Adds a participant to a room (no-op when already present); returns the updated room.
    fn add_participant(
        &self,
        room: &RoomKey,
        user_id: &str,
    ) -> impl Future<Output = Result<Room>> + Send;

    /// Reads messages of one room, oldest first, as described by the query.
    fn history(
        &self,
        room: &RoomKey,
        query: HistoryQuery,
    ) -> impl Future<Output = Result<HistoryPage>> + Send;

    /// Looks one message up by its id.
    fn message_by_id(
        &self,
        room: &RoomKey,
        message_id: &str,
    ) -> impl Future<Output = Result<Option<Message>>> + Send;

    /// Moves the user's read marker in the room to `seq` unless it is already further; returns
    /// the marker now stored.
    fn mark_read(
        &self,
        room: &RoomKey,
        user_id: &str,
        seq: u64,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// The user's read marker in the room (0 when the user never read anything).
    fn read_marker(
        &self,
        room: &RoomKey,
        user_id: &str,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Messages after the user's read marker that someone else sent (notes included only when
    /// `include_notes`).
    fn unread_count(
        &self,
        room: &RoomKey,
        user_id: &str,
        include_notes: bool,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Waits until everything accepted so far is durable, then stops taking writes.
    fn close(&self) -> impl Future<Output = Result<()>> + Send;
}

/// What one group commit did, handed to the backend's commit hook so the caller can turn it into
/// metrics without this crate depending on a metrics library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitStats {
    /// How many write requests the batch held.
    pub batch_size: usize,
    /// How long the transaction took, from `BEGIN` to the end of `COMMIT` (or the rollback).
    pub duration: Duration,
    /// Whether the batch committed; `false` means every request in it failed with
    /// [`Error::Unavailable`].
    pub ok: bool,
}

/// Every compiled-in backend behind one type, so the gateway needs no generics or boxing.
#[derive(Clone)]
#[non_exhaustive]
pub enum AnyStore {
    /// The embedded SQLite backend.
    #[cfg(feature = "sqlite")]
    Sqlite(sqlite::SqliteStore),
}

/// Opens a store from a URL: `sqlite://<path>` (the path may be relative, e.g.
/// `sqlite://./data/gateway.db`), with the default tuning.
pub fn open(url: &str) -> Result<AnyStore> {
    #[cfg(feature = "sqlite")]
    return open_with(url, sqlite::SqliteConfig::default());
    #[cfg(not(feature = "sqlite"))]
    return Err(unsupported_scheme(split_url(url)?.0));
}

/// Opens a store from a URL like [`open`], tuning the embedded backend with `config`.
#[cfg(feature = "sqlite")]
pub fn open_with(url: &str, config: sqlite::SqliteConfig) -> Result<AnyStore> {
    match split_url(url)? {
        ("sqlite", path) => Ok(AnyStore::Sqlite(sqlite::SqliteStore::open(
            std::path::Path::new(path),
            config,
        )?)),
        (other, _) => Err(unsupported_scheme(other)),
    }
}

fn split_url(url: &str) -> Result<(&str, &str)> {
    url.split_once("://")
        .ok_or_else(|| Error::BadUrl(format!("{url:?} has no scheme")))
}

fn unsupported_scheme(scheme: &str) -> Error {
    Error::BadUrl(format!(
        "unsupported store scheme {scheme:?} (compiled in: sqlite)"
    ))
}

macro_rules! dispatch {
    ($self:ident, $store:ident => $call:expr) => {
        match *$self {
            #[cfg(feature = "sqlite")]
            AnyStore::Sqlite(ref $store) => $call,
        }
    };
}

impl Store for AnyStore {
    async fn append(&self, message: NewMessage) -> Result<Appended> {
        dispatch!(self, s => s.append(message).await)
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
    async fn message_by_id(&self, room: &RoomKey, message_id: &str) -> Result<Option<Message>> {
        dispatch!(self, s => s.message_by_id(room, message_id).await)
    }
    async fn mark_read(&self, room: &RoomKey, user_id: &str, seq: u64) -> Result<u64> {
        dispatch!(self, s => s.mark_read(room, user_id, seq).await)
    }
    async fn read_marker(&self, room: &RoomKey, user_id: &str) -> Result<u64> {
        dispatch!(self, s => s.read_marker(room, user_id).await)
    }
    async fn unread_count(
        &self,
        room: &RoomKey,
        user_id: &str,
        include_notes: bool,
    ) -> Result<u64> {
        dispatch!(self, s => s.unread_count(room, user_id, include_notes).await)
    }
    async fn close(&self) -> Result<()> {
        dispatch!(self, s => s.close().await)
    }
}
