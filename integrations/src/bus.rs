//! The bus: topics of keyed records, read by consumer groups that commit what they have
//! handled. [`InProcessBus`] is the default (no Kafka configured: the workers run inside the
//! gateway); a Kafka bus implements the same traits.
//!
//! Delivery is at least once: a group's consumer commits a record after its effect, and a new
//! consumer of the group starts at the first record not committed, so a record whose effect was
//! cut short is read again. Effects are idempotent (by message or provider id).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

/// A record read from a topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub topic: Arc<str>,
    /// The key (a `room_id`): records of one key keep their order.
    pub key: String,
    pub payload: Bytes,
    /// The topic's partition it was read from (the in-process bus has one).
    pub partition: i32,
    /// Its place in the partition.
    pub offset: u64,
}

/// Why a record was not published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The bus's buffer is full: nothing was taken.
    #[error("the bus buffer is full")]
    Full,
    #[error("the bus is unavailable: {0}")]
    Unavailable(String),
    /// The bus will never take this record (too large, a topic it refuses): retrying is
    /// pointless.
    #[error("the bus refused the record: {0}")]
    Rejected(String),
}

/// A future of the bus traits (object safe).
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// A record taken by the bus: it resolves once the record is durable (as the bus defines it).
pub type Delivery = BoxFuture<'static, Result<(), PublishError>>;

/// Where records are published and read.
pub trait Bus: Send + Sync + 'static {
    /// Hands a record to the bus without waiting: `Err` when the bus cannot take it now (its
    /// buffer is full), else a [`Delivery`] to await. Records sent one after another with one
    /// key keep their order, so a publisher may keep many deliveries in flight.
    fn send(&self, topic: &str, key: &str, payload: Bytes) -> Result<Delivery, PublishError>;

    /// Sends a record and waits until it is durable.
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        key: &'a str,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<(), PublishError>> {
        let sent = self.send(topic, key, payload);
        Box::pin(async move { sent?.await })
    }

    /// Whether a record sent to `topic` now would be kept for a reader. A broker keeps every
    /// record; the in-process bus keeps none for a topic no group reads, so a publisher may skip
    /// building records for it.
    fn keeps(&self, _topic: &str) -> bool {
        true
    }

    /// Subscriptions taken so far: what [`Bus::keeps`] answers changes only when this does, so
    /// a caller may keep its answers until then.
    fn subscriptions(&self) -> u64 {
        0
    }

    /// Whether the bus is reachable now (`/readyz` detail): the in-process bus always is.
    fn healthy(&self) -> bool {
        true
    }

    /// Waits up to `timeout` for the records sent so far to be durable (at shutdown).
    fn flush(&self, _timeout: std::time::Duration) {}

    /// A consumer of `topic` in consumer group `group`, from the group's first uncommitted
    /// record.
    fn subscribe(&self, topic: &str, group: &str) -> Box<dyn Consumer>;
}

/// Reads one topic for one group.
pub trait Consumer: Send {
    /// The next record (waits for one); `None` once the bus is closed.
    fn next(&mut self) -> BoxFuture<'_, Option<Record>>;

    /// Marks `record` and everything before it (in its partition) handled by the group.
    fn commit(&mut self, record: &Record);

    /// Records of the topic the group has not committed yet, as last known.
    fn lag(&self) -> u64;
}

/// The in-process bus: a bounded log per topic, kept until every group that reads it has
/// committed past a record. A topic no group has subscribed to keeps nothing.
pub struct InProcessBus {
    topics: Mutex<HashMap<String, Arc<TopicLog>>>,
    /// Counted after each subscription is in place (see [`Bus::subscriptions`]).
    subscriptions: AtomicU64,
    /// Most payload bytes one topic holds; past it a publish is [`PublishError::Full`].
    max_topic_bytes: usize,
}

struct TopicLog {
    name: Arc<str>,
    state: Mutex<LogState>,
    grown: Notify,
}

#[derive(Default)]
struct LogState {
    /// Records from `first` on.
    records: VecDeque<(String, Bytes)>,
    first: u64,
    bytes: usize,
    /// Each group's first uncommitted offset.
    committed: HashMap<String, u64>,
    closed: bool,
}

impl LogState {
    fn next_offset(&self) -> u64 {
        self.first + self.records.len() as u64
    }

    fn lag(&self, group: &str) -> u64 {
        let committed = self.committed.get(group).copied().unwrap_or(self.first);
        self.next_offset() - committed.max(self.first)
    }

    /// Drops the records every group has committed (all of them while no group reads).
    fn trim(&mut self) {
        let Some(&keep_from) = self.committed.values().min() else {
            return;
        };
        while self.first < keep_from {
            match self.records.pop_front() {
                Some((_, payload)) => {
                    self.bytes -= payload.len();
                    self.first += 1;
                }
                None => break,
            }
        }
    }
}

impl InProcessBus {
    pub fn new(max_topic_bytes: usize) -> Arc<InProcessBus> {
        Arc::new(InProcessBus {
            topics: Mutex::new(HashMap::new()),
            subscriptions: AtomicU64::new(0),
            max_topic_bytes,
        })
    }

    fn topic(&self, name: &str) -> Arc<TopicLog> {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(TopicLog {
                    name: name.into(),
                    state: Mutex::new(LogState::default()),
                    grown: Notify::new(),
                })
            })
            .clone()
    }

    /// Records of `topic` not yet committed by `group` (a consumer's lag).
    pub fn lag(&self, topic: &str, group: &str) -> u64 {
        let log = self.topic(topic);
        let state = log.state.lock().unwrap_or_else(|p| p.into_inner());
        state.lag(group)
    }

    /// Stops every consumer (their `next` answers `None`).
    pub fn close(&self) {
        let topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        for log in topics.values() {
            log.state.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
            log.grown.notify_waiters();
        }
    }
}

impl Bus for InProcessBus {
    fn subscriptions(&self) -> u64 {
        self.subscriptions.load(Ordering::Acquire)
    }

    fn keeps(&self, topic: &str) -> bool {
        let topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics.get(topic).is_some_and(|log| {
            let state = log.state.lock().unwrap_or_else(|p| p.into_inner());
            !state.committed.is_empty()
        })
    }

    fn send(&self, topic: &str, key: &str, payload: Bytes) -> Result<Delivery, PublishError> {
        let log = self.topic(topic);
        {
            let mut state = log.state.lock().unwrap_or_else(|p| p.into_inner());
            // With no reader in this process there is no one to keep it for.
            if !state.committed.is_empty() {
                if state.bytes + payload.len() > self.max_topic_bytes {
                    return Err(PublishError::Full);
                }
                state.bytes += payload.len();
                state.records.push_back((key.to_owned(), payload));
            }
        }
        log.grown.notify_waiters();
        Ok(Box::pin(std::future::ready(Ok(()))))
    }

    fn subscribe(&self, topic: &str, group: &str) -> Box<dyn Consumer> {
        let log = self.topic(topic);
        let position = {
            let mut state = log.state.lock().unwrap_or_else(|p| p.into_inner());
            let first = state.first;
            *state.committed.entry(group.to_owned()).or_insert(first)
        };
        self.subscriptions.fetch_add(1, Ordering::Release);
        Box::new(InProcessConsumer {
            log,
            group: group.to_owned(),
            position,
        })
    }
}

struct InProcessConsumer {
    log: Arc<TopicLog>,
    group: String,
    /// The next offset this consumer reads.
    position: u64,
}

impl Consumer for InProcessConsumer {
    fn next(&mut self) -> BoxFuture<'_, Option<Record>> {
        Box::pin(async move {
            loop {
                // Registered before looking, so a publish in between is not missed.
                let grown = self.log.grown.notified();
                {
                    let state = self.log.state.lock().unwrap_or_else(|p| p.into_inner());
                    if state.closed {
                        return None;
                    }
                    // Records trimmed under it were committed by this group too.
                    self.position = self.position.max(state.first);
                    let index = (self.position - state.first) as usize;
                    if let Some((key, payload)) = state.records.get(index) {
                        let record = Record {
                            topic: self.log.name.clone(),
                            key: key.clone(),
                            payload: payload.clone(),
                            partition: 0,
                            offset: self.position,
                        };
                        self.position += 1;
                        return Some(record);
                    }
                }
                grown.await;
            }
        })
    }

    fn commit(&mut self, record: &Record) {
        let mut state = self.log.state.lock().unwrap_or_else(|p| p.into_inner());
        let committed = state.committed.entry(self.group.clone()).or_insert(0);
        *committed = (*committed).max(record.offset + 1);
        state.trim();
    }

    fn lag(&self) -> u64 {
        let state = self.log.state.lock().unwrap_or_else(|p| p.into_inner());
        state.lag(&self.group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn publish(bus: &InProcessBus, key: &str, text: &str) -> Result<(), PublishError> {
        bus.publish("t", key, Bytes::copy_from_slice(text.as_bytes()))
            .await
    }

    #[tokio::test]
    async fn an_uncommitted_record_is_read_again_by_the_groups_next_consumer() {
        let bus = InProcessBus::new(1 << 20);
        let mut first = bus.subscribe("t", "workers");
        publish(&bus, "r1", "a").await.unwrap();
        publish(&bus, "r1", "b").await.unwrap();
        let a = first.next().await.unwrap();
        assert_eq!(a.payload, "a");
        first.commit(&a);
        let b = first.next().await.unwrap();
        assert_eq!((b.payload.as_ref(), b.offset), (&b"b"[..], 1));
        // Cut short before committing b: the next consumer starts there.
        drop(first);
        let mut second = bus.subscribe("t", "workers");
        assert_eq!(second.next().await.unwrap().payload, "b");
        assert_eq!(bus.lag("t", "workers"), 1);
        // Another group reads everything still held.
        let mut other = bus.subscribe("t", "audit");
        assert_eq!(other.next().await.unwrap().payload, "b");
    }

    #[tokio::test]
    async fn a_topic_keeps_records_once_a_group_reads_it() {
        let bus = InProcessBus::new(1 << 20);
        assert!(!bus.keeps("t"));
        assert_eq!(bus.subscriptions(), 0);
        // Sent while no group reads: nothing to keep, and a later reader does not see it.
        publish(&bus, "k", "early").await.unwrap();
        assert!(!bus.keeps("t"));
        let mut consumer = bus.subscribe("t", "g");
        assert_eq!(bus.subscriptions(), 1);
        assert!(bus.keeps("t"));
        assert!(!bus.keeps("other"));
        publish(&bus, "k", "late").await.unwrap();
        assert_eq!(consumer.next().await.unwrap().payload, "late");
    }

    #[tokio::test]
    async fn a_full_topic_refuses_until_its_readers_commit() {
        let bus = InProcessBus::new(4);
        let mut consumer = bus.subscribe("t", "g");
        publish(&bus, "k", "ab").await.unwrap();
        publish(&bus, "k", "cd").await.unwrap();
        assert_eq!(publish(&bus, "k", "e").await, Err(PublishError::Full));
        let first = consumer.next().await.unwrap();
        consumer.commit(&first);
        publish(&bus, "k", "e").await.unwrap();
        assert_eq!(consumer.next().await.unwrap().payload, "cd");
    }

    #[tokio::test]
    async fn a_waiting_consumer_wakes_for_a_publish_and_ends_at_close() {
        let bus = InProcessBus::new(1 << 20);
        let mut consumer = bus.subscribe("t", "g");
        let reader = tokio::spawn(async move {
            let record = consumer.next().await;
            (record, consumer.next().await)
        });
        tokio::task::yield_now().await;
        publish(&bus, "k", "x").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        bus.close();
        let (record, end) = reader.await.unwrap();
        assert_eq!(record.unwrap().payload, "x");
        assert!(end.is_none());
    }
}
