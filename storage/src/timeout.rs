//! A deadline on every store call, as a wrapper that implements [`Store`] itself (in the manner
//! of quickwit's `timeout_and_retry_storage`), so callers need no timeout code of their own.
//!
//! A read that misses its deadline fails with [`Error::NotApplied`]: nothing changed. A write
//! that misses it fails with [`Error::OutcomeUnknown`]: the backend may still apply it after the
//! caller gave up, so a retry must reuse the same ids (appends are idempotent on the message id,
//! the other writes are idempotent by nature). [`Store::close`] has no deadline: it waits for
//! every accepted write to become durable, which is the point of calling it.

use std::future::Future;
use std::time::Duration;

use crate::records::{ListPage, ListQuery};
use crate::{
    Appended, Error, HistoryPage, HistoryQuery, Message, NewMessage, NewRoom, ReadState, Record,
    RecordKey, RecordKind, Result, Room, RoomKey, SearchQuery, Store,
};

/// Wraps a store so that every call but `close` fails once `limit` has passed.
///
/// The futures need a tokio runtime with its time driver enabled.
#[derive(Debug, Clone)]
pub struct TimeoutStore<S> {
    inner: S,
    limit: Duration,
}

impl<S: Store> TimeoutStore<S> {
    /// `inner` with a deadline of `limit` on each call.
    pub fn new(inner: S, limit: Duration) -> Self {
        TimeoutStore { inner, limit }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    async fn read<T>(&self, what: &str, call: impl Future<Output = Result<T>>) -> Result<T> {
        tokio::time::timeout(self.limit, call)
            .await
            .unwrap_or_else(|_| {
                Err(Error::NotApplied(format!(
                    "storage {what} timed out after {:?}",
                    self.limit
                )))
            })
    }

    async fn write<T>(&self, what: &str, call: impl Future<Output = Result<T>>) -> Result<T> {
        tokio::time::timeout(self.limit, call)
            .await
            .unwrap_or_else(|_| {
                Err(Error::OutcomeUnknown(format!(
                    "storage {what} timed out after {:?}",
                    self.limit
                )))
            })
    }
}

impl<S: Store> Store for TimeoutStore<S> {
    fn append(
        &self,
        message: NewMessage,
    ) -> impl Future<Output = Result<Appended>> + Send + 'static {
        // Queued now, so appends keep the order of the calls; the deadline covers the wait.
        let pending = self.inner.append(message);
        let limit = self.limit;
        async move {
            tokio::time::timeout(limit, pending)
                .await
                .unwrap_or_else(|_| {
                    Err(Error::OutcomeUnknown(format!(
                        "storage append timed out after {limit:?}"
                    )))
                })
        }
    }

    async fn create_room(&self, room: NewRoom) -> Result<(Room, bool)> {
        self.write("create_room", self.inner.create_room(room))
            .await
    }

    async fn room(&self, room: &RoomKey) -> Result<Option<Room>> {
        self.read("room", self.inner.room(room)).await
    }

    async fn add_participant(&self, room: &RoomKey, user_id: &str) -> Result<Room> {
        self.write("add_participant", self.inner.add_participant(room, user_id))
            .await
    }

    async fn history(&self, room: &RoomKey, query: HistoryQuery) -> Result<HistoryPage> {
        self.read("history", self.inner.history(room, query)).await
    }

    async fn search(&self, room: &RoomKey, query: SearchQuery) -> Result<HistoryPage> {
        self.read("search", self.inner.search(room, query)).await
    }

    async fn message_by_id(&self, room: &RoomKey, message_id: &str) -> Result<Option<Message>> {
        self.read("message_by_id", self.inner.message_by_id(room, message_id))
            .await
    }

    async fn mark_read(&self, room: &RoomKey, user_id: &str, seq: u64) -> Result<ReadState> {
        self.write("mark_read", self.inner.mark_read(room, user_id, seq))
            .await
    }

    async fn read_state(&self, room: &RoomKey, user_id: &str) -> Result<ReadState> {
        self.read("read_state", self.inner.read_state(room, user_id))
            .await
    }

    async fn record(&self, key: &RecordKey) -> Result<Option<Record>> {
        self.read("record", self.inner.record(key)).await
    }

    async fn put_record(&self, record: Record) -> Result<Record> {
        self.write("put_record", self.inner.put_record(record))
            .await
    }

    async fn list_records(
        &self,
        tenant_id: &str,
        kind: RecordKind,
        query: ListQuery,
    ) -> Result<ListPage> {
        self.read(
            "list_records",
            self.inner.list_records(tenant_id, kind, query),
        )
        .await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store whose calls never finish (a wedged disk, a lost connection).
    struct Stalled;

    impl Store for Stalled {
        fn append(&self, _: NewMessage) -> impl Future<Output = Result<Appended>> + Send + 'static {
            std::future::pending()
        }
        async fn create_room(&self, _: NewRoom) -> Result<(Room, bool)> {
            std::future::pending().await
        }
        async fn room(&self, _: &RoomKey) -> Result<Option<Room>> {
            std::future::pending().await
        }
        async fn add_participant(&self, _: &RoomKey, _: &str) -> Result<Room> {
            std::future::pending().await
        }
        async fn history(&self, _: &RoomKey, _: HistoryQuery) -> Result<HistoryPage> {
            std::future::pending().await
        }
        async fn message_by_id(&self, _: &RoomKey, _: &str) -> Result<Option<Message>> {
            std::future::pending().await
        }
        async fn search(&self, _: &RoomKey, _: SearchQuery) -> Result<HistoryPage> {
            std::future::pending().await
        }
        async fn mark_read(&self, _: &RoomKey, _: &str, _: u64) -> Result<ReadState> {
            std::future::pending().await
        }
        async fn read_state(&self, _: &RoomKey, _: &str) -> Result<ReadState> {
            std::future::pending().await
        }
        async fn record(&self, _: &RecordKey) -> Result<Option<Record>> {
            std::future::pending().await
        }
        async fn put_record(&self, _: Record) -> Result<Record> {
            std::future::pending().await
        }
        async fn list_records(&self, _: &str, _: RecordKind, _: ListQuery) -> Result<ListPage> {
            std::future::pending().await
        }
        async fn close(&self) -> Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn stalled_calls_fail_after_the_deadline_writes_as_outcome_unknown() {
        let store = TimeoutStore::new(Stalled, Duration::from_millis(50));
        let room = RoomKey::new("t", "r");
        let started = std::time::Instant::now();
        let error = store
            .append(NewMessage::text(&room, 1, "alice", "hi"))
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(&error, Error::OutcomeUnknown(m) if m.contains("append timed out")));
        assert!(error.is_retryable());
        let writes = [
            store
                .create_room(NewRoom::team("r", "t", "alice"))
                .await
                .map(|_| ()),
            store.add_participant(&room, "bob").await.map(|_| ()),
            store.mark_read(&room, "bob", 1).await.map(|_| ()),
        ];
        for result in writes {
            let error = result.unwrap_err();
            assert!(matches!(error, Error::OutcomeUnknown(_)), "{error:?}");
        }
        let reads = [
            store.room(&room).await.map(|_| ()),
            store
                .history(&room, HistoryQuery::default())
                .await
                .map(|_| ()),
            store.message_by_id(&room, "m").await.map(|_| ()),
            store
                .search(&room, HistoryQuery::default().search("hi"))
                .await
                .map(|_| ()),
            store.read_state(&room, "bob").await.map(|_| ()),
        ];
        for result in reads {
            let error = result.unwrap_err();
            assert!(matches!(error, Error::NotApplied(_)), "{error:?}");
            assert!(error.is_retryable());
        }
        store.close().await.unwrap();
    }

    /// Calls that finish in time pass through unchanged: the whole backend suite, wrapped.
    #[cfg(feature = "sqlite")]
    mod wrapped_sqlite {
        use super::*;
        use crate::sqlite::{SqliteConfig, SqliteStore};

        async fn fresh_store() -> (TimeoutStore<SqliteStore>, tempfile::TempDir) {
            let dir = tempfile::tempdir().unwrap();
            let store =
                SqliteStore::open(&dir.path().join("chat.db"), SqliteConfig::default()).unwrap();
            (TimeoutStore::new(store, Duration::from_secs(30)), dir)
        }

        crate::conformance_tests!(fresh_store);
    }
}
