//! The Kafka bus (rdkafka over a bundled librdkafka), for when the gateway and the workers run
//! as separate processes (`--kafka-brokers`).
//!
//! Producing: `acks=all` and idempotence on, so a retried batch is written once and a key's
//! records keep their order; a record waits in librdkafka's queue, bounded in bytes, until a
//! broker takes it, for as long as that takes (no delivery timeout: while Kafka is down records
//! wait and are retried, and a full queue refuses new ones with [`PublishError::Full`]).
//!
//! Consuming: offsets are committed only for records the application marked handled
//! ([`Consumer::commit`] stores the offset; librdkafka commits stored offsets every second and
//! on close), so a record is read again when its effect was cut short: at least once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer as _, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientContext;

use crate::bus::{BoxFuture, Bus, Consumer, Delivery, PublishError, Record};

/// How a process reaches Kafka.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `host:port,…`
    pub brokers: String,
    /// Most bytes of records waiting in the producer for a broker.
    pub max_buffer_bytes: usize,
    /// `client.id`, which names this process in the brokers' logs and quotas.
    pub client_id: String,
    /// How long the producer waits to fill a batch (`linger.ms`): the gateway keeps many
    /// records in flight and gains from batches; a worker awaits each record it produces.
    pub linger_ms: u32,
}

/// What librdkafka's statistics say, kept for `healthy` and `lag`.
#[derive(Default)]
struct Observed {
    /// Whether some broker's connection is up.
    up: AtomicBool,
    /// Whether statistics arrived at all yet (until then the client is still connecting).
    seen: AtomicBool,
    /// Consumer lag by topic (the sum over its assigned partitions).
    lag: Mutex<HashMap<String, u64>>,
}

/// Receives librdkafka's statistics and errors.
#[derive(Clone, Default)]
struct Context {
    observed: Arc<Observed>,
}

impl ClientContext for Context {
    fn stats_raw(&self, statistics: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Stats {
            #[serde(default)]
            brokers: HashMap<String, BrokerStats>,
            #[serde(default)]
            topics: HashMap<String, TopicStats>,
        }
        #[derive(serde::Deserialize)]
        struct BrokerStats {
            nodeid: i32,
            state: String,
        }
        #[derive(serde::Deserialize)]
        struct TopicStats {
            #[serde(default)]
            partitions: HashMap<String, PartitionStats>,
        }
        #[derive(serde::Deserialize)]
        struct PartitionStats {
            #[serde(default)]
            consumer_lag: i64,
        }
        let Ok(stats) = serde_json::from_slice::<Stats>(statistics) else {
            return;
        };
        let up = stats
            .brokers
            .values()
            .any(|broker| broker.nodeid >= 0 && broker.state == "UP");
        self.observed.up.store(up, Ordering::Relaxed);
        self.observed.seen.store(true, Ordering::Relaxed);
        let mut lag = self.observed.lag.lock().unwrap_or_else(|p| p.into_inner());
        for (topic, topic_stats) in stats.topics {
            // Partition "-1" is librdkafka's internal unassigned one; -1 lag means unknown.
            let sum = topic_stats
                .partitions
                .iter()
                .filter(|(partition, _)| partition.as_str() != "-1")
                .map(|(_, p)| p.consumer_lag.max(0) as u64)
                .sum();
            lag.insert(topic, sum);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::AllBrokersDown)
        ) {
            self.observed.up.store(false, Ordering::Relaxed);
        }
        tracing::warn!(%error, reason, "kafka");
    }
}

impl ConsumerContext for Context {}

/// The Kafka bus: one producer for the process, a consumer per subscription.
pub struct KafkaBus {
    settings: KafkaSettings,
    producer: FutureProducer<Context>,
    context: Context,
}

impl KafkaBus {
    pub fn connect(settings: KafkaSettings) -> Result<Arc<KafkaBus>, KafkaError> {
        let context = Context::default();
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &settings.brokers)
            .set("client.id", &settings.client_id)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            // No delivery timeout: a record waits (bounded by the queue) until Kafka is back.
            .set("message.timeout.ms", "0")
            .set(
                "queue.buffering.max.kbytes",
                (settings.max_buffer_bytes / 1024).max(1).to_string(),
            )
            .set("queue.buffering.max.messages", "1000000")
            .set("linger.ms", settings.linger_ms.to_string())
            .set("compression.type", "lz4")
            .set("statistics.interval.ms", "1000")
            .create_with_context(context.clone())?;
        Ok(Arc::new(KafkaBus {
            settings,
            producer,
            context,
        }))
    }

    /// Records waiting in the producer for a broker's acknowledgement.
    pub fn buffered_records(&self) -> usize {
        use rdkafka::producer::Producer as _;
        self.producer.in_flight_count().max(0) as usize
    }
}

/// Whether an error of a send or delivery would go away by retrying.
fn publish_error(error: KafkaError) -> PublishError {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::QueueFull) => PublishError::Full,
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::InvalidMessage,
        ) => PublishError::Rejected(error.to_string()),
        _ => PublishError::Unavailable(error.to_string()),
    }
}

impl Bus for KafkaBus {
    fn send(&self, topic: &str, key: &str, payload: Bytes) -> Result<Delivery, PublishError> {
        let record = FutureRecord::to(topic).key(key).payload(payload.as_ref());
        let delivery = self
            .producer
            .send_result(record)
            .map_err(|(error, _)| publish_error(error))?;
        Ok(Box::pin(async move {
            match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((error, _))) => Err(publish_error(error)),
                // The producer was dropped with the record still queued.
                Err(_) => Err(PublishError::Unavailable("the producer closed".into())),
            }
        }))
    }

    fn flush(&self, timeout: Duration) {
        use rdkafka::producer::Producer as _;
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "records were still waiting for Kafka at shutdown");
        }
    }

    fn healthy(&self) -> bool {
        let observed = &self.context.observed;
        observed.up.load(Ordering::Relaxed) || !observed.seen.load(Ordering::Relaxed)
    }

    fn subscribe(&self, topic: &str, group: &str) -> Box<dyn Consumer> {
        Box::new(KafkaConsumer::new(&self.settings, topic, group))
    }
}

/// A consumer of one topic in one group. A consumer that could not be created (a bad setting)
/// says why in the log on each read and reads nothing.
struct KafkaConsumer {
    consumer: Result<StreamConsumer<Context>, KafkaError>,
    topic: String,
    context: Context,
    /// Records read and not yet committed (the lag before statistics arrive).
    pending: AtomicU64,
}

impl KafkaConsumer {
    fn new(settings: &KafkaSettings, topic: &str, group: &str) -> KafkaConsumer {
        let context = Context::default();
        let consumer = ClientConfig::new()
            .set("bootstrap.servers", &settings.brokers)
            .set("client.id", &settings.client_id)
            .set("group.id", group)
            .set("auto.offset.reset", "earliest")
            // Offsets are stored by `commit`, after the effect; librdkafka commits what is
            // stored every second and when the consumer closes (dropped).
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            // A topic nobody has written yet is created (where the brokers allow it) rather
            // than waited for until the next metadata refresh, minutes later.
            .set("allow.auto.create.topics", "true")
            // A consumer that died (killed, its machine gone) holds its partitions this long
            // before the group gives them to another.
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "2000")
            .set("topic.metadata.refresh.interval.ms", "10000")
            .set("statistics.interval.ms", "1000")
            .create_with_context::<_, StreamConsumer<Context>>(context.clone())
            .and_then(|consumer| {
                consumer.subscribe(&[topic])?;
                Ok(consumer)
            });
        KafkaConsumer {
            consumer,
            topic: topic.to_owned(),
            context,
            pending: AtomicU64::new(0),
        }
    }
}

impl Consumer for KafkaConsumer {
    fn next(&mut self) -> BoxFuture<'_, Option<Record>> {
        Box::pin(async move {
            let mut wait = Duration::from_millis(100);
            loop {
                let consumer = match &self.consumer {
                    Ok(consumer) => consumer,
                    Err(e) => {
                        tracing::error!(topic = self.topic, error = %e, "no Kafka consumer");
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        continue;
                    }
                };
                match consumer.recv().await {
                    Ok(message) => {
                        self.pending.fetch_add(1, Ordering::Relaxed);
                        return Some(Record {
                            topic: message.topic().into(),
                            key: String::from_utf8_lossy(message.key().unwrap_or_default())
                                .into_owned(),
                            payload: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
                            partition: message.partition(),
                            offset: message.offset().max(0) as u64,
                        });
                    }
                    Err(e) => {
                        tracing::warn!(topic = self.topic, error = %e, "reading from Kafka");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(5));
                    }
                }
            }
        })
    }

    fn commit(&mut self, record: &Record) {
        let Ok(consumer) = &self.consumer else {
            return;
        };
        // librdkafka stores `offset + 1`, the next one to read.
        match consumer.store_offset(&record.topic, record.partition, record.offset as i64) {
            Ok(()) => {
                let _ = self
                    .pending
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        Some(n.saturating_sub(1))
                    });
            }
            // The partition went to another consumer of the group: it reads the record again.
            Err(e) => tracing::warn!(topic = self.topic, error = %e, "storing an offset"),
        }
    }

    fn lag(&self) -> u64 {
        let lag = self
            .context
            .observed
            .lag
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        lag.get(&self.topic)
            .copied()
            .unwrap_or_else(|| self.pending.load(Ordering::Relaxed))
    }
}
