//! Latency and outcome metrics of every store call, as a wrapper that implements [`Store`]
//! itself, so no backend and no caller carries metrics code (the same shape as
//! [`crate::TimeoutStore`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use prometheus::core::Collector;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

use crate::records::{ListPage, ListQuery};
use crate::{
    Appended, HistoryPage, HistoryQuery, Message, NewMessage, NewRoom, ReadState, Record,
    RecordKey, RecordKind, Result, Room, RoomKey, SearchQuery, Store,
};

/// The metrics [`MeteredStore`] records, shared by its clones.
#[derive(Debug, Clone)]
pub struct StoreMetrics {
    /// `gateway_store_operation_seconds{operation}`: how long each call took, failures included.
    pub seconds: HistogramVec,
    /// `gateway_store_errors_total{operation,kind}`: failed calls by [`crate::Error::kind`].
    pub errors: IntCounterVec,
}

impl StoreMetrics {
    /// Fresh, unregistered metrics.
    pub fn new() -> Self {
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "gateway_store_operation_seconds",
                "duration of one store call, from the call to its answer",
            )
            .buckets(vec![
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5, 5.0,
            ]),
            &["operation"],
        )
        .expect("valid histogram options");
        let errors = IntCounterVec::new(
            Opts::new(
                "gateway_store_errors_total",
                "store calls that failed, by kind (not_applied, seq_conflict, invalid, outcome_unknown, closed)",
            ),
            &["operation", "kind"],
        )
        .expect("valid counter options");
        StoreMetrics { seconds, errors }
    }

    /// The collectors, for a registry.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.seconds.clone()),
            Box::new(self.errors.clone()),
        ]
    }

    fn record<T>(&self, operation: &str, started: Instant, result: &Result<T>) {
        self.seconds
            .with_label_values(&[operation])
            .observe(started.elapsed().as_secs_f64());
        if let Err(error) = result {
            self.errors
                .with_label_values(&[operation, error.kind()])
                .inc();
        }
    }
}

impl Default for StoreMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Wraps a store so that every call is timed and its failures counted by kind.
#[derive(Debug, Clone)]
pub struct MeteredStore<S> {
    inner: S,
    metrics: Arc<StoreMetrics>,
}

impl<S: Store> MeteredStore<S> {
    /// `inner`, recording into `metrics`.
    pub fn new(inner: S, metrics: StoreMetrics) -> Self {
        MeteredStore {
            inner,
            metrics: Arc::new(metrics),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    async fn timed<T>(&self, operation: &str, call: impl Future<Output = Result<T>>) -> Result<T> {
        let started = Instant::now();
        let result = call.await;
        self.metrics.record(operation, started, &result);
        result
    }
}

impl<S: Store> Store for MeteredStore<S> {
    fn append(
        &self,
        message: NewMessage,
    ) -> impl Future<Output = Result<Appended>> + Send + 'static {
        let started = Instant::now();
        let pending = self.inner.append(message);
        let metrics = Arc::clone(&self.metrics);
        async move {
            let result = pending.await;
            metrics.record("append", started, &result);
            result
        }
    }

    async fn create_room(&self, room: NewRoom) -> Result<(Room, bool)> {
        self.timed("create_room", self.inner.create_room(room))
            .await
    }

    async fn room(&self, room: &RoomKey) -> Result<Option<Room>> {
        self.timed("room", self.inner.room(room)).await
    }

    async fn add_participant(&self, room: &RoomKey, user_id: &str) -> Result<Room> {
        self.timed("add_participant", self.inner.add_participant(room, user_id))
            .await
    }

    async fn history(&self, room: &RoomKey, query: HistoryQuery) -> Result<HistoryPage> {
        self.timed("history", self.inner.history(room, query)).await
    }

    async fn search(&self, room: &RoomKey, query: SearchQuery) -> Result<HistoryPage> {
        self.timed("search", self.inner.search(room, query)).await
    }

    async fn message_by_id(&self, room: &RoomKey, message_id: &str) -> Result<Option<Message>> {
        self.timed("message_by_id", self.inner.message_by_id(room, message_id))
            .await
    }

    async fn mark_read(&self, room: &RoomKey, user_id: &str, seq: u64) -> Result<ReadState> {
        self.timed("mark_read", self.inner.mark_read(room, user_id, seq))
            .await
    }

    async fn read_state(&self, room: &RoomKey, user_id: &str) -> Result<ReadState> {
        self.timed("read_state", self.inner.read_state(room, user_id))
            .await
    }

    async fn record(&self, key: &RecordKey) -> Result<Option<Record>> {
        self.timed("record", self.inner.record(key)).await
    }

    async fn put_record(&self, record: Record) -> Result<Record> {
        self.timed("put_record", self.inner.put_record(record))
            .await
    }

    async fn list_records(
        &self,
        tenant_id: &str,
        kind: RecordKind,
        query: ListQuery,
    ) -> Result<ListPage> {
        self.timed(
            "list_records",
            self.inner.list_records(tenant_id, kind, query),
        )
        .await
    }

    async fn close(&self) -> Result<()> {
        self.timed("close", self.inner.close()).await
    }
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use super::*;
    use crate::Error;

    #[tokio::test]
    async fn calls_are_timed_and_failures_counted_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("m.db").display());
        let metrics = StoreMetrics::new();
        let store = MeteredStore::new(crate::open(&url).unwrap(), metrics.clone());
        let room = RoomKey::new("t", "r");
        let error = store
            .append(NewMessage::text(&room, 1, "alice", "hi"))
            .await
            .unwrap_err();
        assert!(matches!(error, Error::Invalid(_)), "{error:?}");
        store
            .create_room(NewRoom::team("r", "t", "alice"))
            .await
            .unwrap();
        store
            .append(NewMessage::text(&room, 1, "alice", "hi"))
            .await
            .unwrap();
        let appends = metrics.seconds.with_label_values(&["append"]);
        assert_eq!(appends.get_sample_count(), 2);
        assert_eq!(
            metrics
                .errors
                .with_label_values(&["append", "invalid"])
                .get(),
            1
        );
        assert_eq!(
            metrics
                .seconds
                .with_label_values(&["create_room"])
                .get_sample_count(),
            1
        );
        store.close().await.unwrap();
    }
}
