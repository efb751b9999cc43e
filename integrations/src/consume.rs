//! The consuming loop every reader of the bus runs (the gateway's and each worker's): read a
//! record, apply its effect, commit it after the effect; a record whose payload is bad goes to
//! the dead-letter topic with the reason, and one whose effect failed for now is tried again
//! with backoff, holding back the records after it so that a room's order holds.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prometheus::{IntCounterVec, IntGauge};
use tokio::sync::watch;

use crate::bus::{Bus, Consumer, PublishError, Record};
use crate::events::{self, DeadLetter};

/// What became of a record's effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done (or found already done): commit it.
    Handled,
    /// It can never be handled (its payload is bad): to the dead-letter topic with the reason,
    /// then commit it.
    Dead(String),
    /// Not now (a store or a provider is unavailable): try again after a while.
    Retry(String),
    /// Not now, and the provider said when to try again (`Retry-After`).
    RetryAfter(Duration, String),
}

/// Where a loop sends what it cannot handle, and what it counts.
#[derive(Clone)]
pub struct ConsumeContext {
    pub bus: Arc<dyn Bus>,
    pub dead_letters: String,
    /// Records read, by `topic` and `outcome` (`handled`, `dead_letter`, `retried`).
    pub consumed: IntCounterVec,
    /// The consumer's lag ([`Consumer::lag`]), set as records are handled.
    pub lag: IntGauge,
    /// Longest wait between two tries of one record.
    pub max_backoff: Duration,
}

/// Reads `consumer` until the bus closes or `stop` turns true, handling each record with
/// `handle`. A record is committed only after its effect: a process killed before that reads
/// it again (at least once; effects are idempotent).
pub async fn run<H, F>(
    context: ConsumeContext,
    mut consumer: Box<dyn Consumer>,
    mut stop: watch::Receiver<bool>,
    mut handle: H,
) where
    H: FnMut(Record) -> F,
    F: Future<Output = Outcome>,
{
    loop {
        if *stop.borrow() {
            return;
        }
        let record = tokio::select! {
            record = consumer.next() => match record {
                Some(record) => record,
                None => return,
            },
            _ = stop.changed() => return,
        };
        let mut wait = Duration::from_millis(100);
        loop {
            let counted = |outcome: &str| {
                context
                    .consumed
                    .with_label_values(&[&record.topic, outcome])
                    .inc()
            };
            match handle(record.clone()).await {
                Outcome::Handled => {
                    counted("handled");
                    break;
                }
                Outcome::Dead(reason) => {
                    counted("dead_letter");
                    dead_letter(&context, &record, reason).await;
                    break;
                }
                Outcome::Retry(reason) | Outcome::RetryAfter(_, reason) if *stop.borrow() => {
                    tracing::info!(topic = %record.topic, reason, "stopping before a retry");
                    return;
                }
                Outcome::Retry(reason) => {
                    counted("retried");
                    context.lag.set(consumer.lag() as i64);
                    tracing::warn!(topic = %record.topic, reason, "a record will be handled again");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.changed() => return,
                    }
                    wait = (wait * 2).min(context.max_backoff);
                }
                Outcome::RetryAfter(after, reason) => {
                    counted("retried");
                    context.lag.set(consumer.lag() as i64);
                    tracing::warn!(topic = %record.topic, reason, ?after, "the provider asked to wait");
                    tokio::select! {
                        _ = tokio::time::sleep(after) => {}
                        _ = stop.changed() => return,
                    }
                }
            }
        }
        // After the effect: a crash before this reads the record again.
        consumer.commit(&record);
        context.lag.set(consumer.lag() as i64);
    }
}

/// Sends a record that cannot be handled to the dead-letter topic, with the reason.
async fn dead_letter(context: &ConsumeContext, record: &Record, reason: String) {
    tracing::warn!(topic = %record.topic, reason, "a record went to the dead-letter topic");
    let letter = DeadLetter {
        v: events::VERSION,
        topic: record.topic.to_string(),
        key: record.key.clone(),
        reason,
        payload: String::from_utf8_lossy(&record.payload).into_owned(),
    };
    publish_until_taken(
        context.bus.as_ref(),
        &context.dead_letters,
        &record.key,
        events::encode(&letter),
    )
    .await;
}

/// Publishes and waits, trying again with backoff while the bus cannot take it; a record the
/// bus refuses for good is logged and given up.
pub async fn publish_until_taken(bus: &dyn Bus, topic: &str, key: &str, payload: Bytes) {
    let mut wait = Duration::from_millis(50);
    loop {
        match bus.publish(topic, key, payload.clone()).await {
            Ok(()) => return,
            Err(PublishError::Rejected(reason)) => {
                tracing::error!(topic, reason, "the bus refused a record for good");
                return;
            }
            Err(e) => {
                tracing::warn!(topic, error = %e, "the bus did not take a record; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InProcessBus;

    fn context(bus: &Arc<InProcessBus>) -> ConsumeContext {
        ConsumeContext {
            bus: bus.clone(),
            dead_letters: "dead".into(),
            consumed: IntCounterVec::new(prometheus::Opts::new("c", "c"), &["topic", "outcome"])
                .unwrap(),
            lag: IntGauge::new("lag", "lag").unwrap(),
            max_backoff: Duration::from_millis(20),
        }
    }

    #[tokio::test]
    async fn a_retried_record_holds_back_the_next_and_a_bad_one_is_dead_lettered() {
        let bus = InProcessBus::new(1 << 20);
        let consumer = bus.subscribe("in", "g");
        let mut dead = bus.subscribe("dead", "audit");
        for payload in ["retry-once", "bad", "good"] {
            bus.publish("in", "k", Bytes::from(payload)).await.unwrap();
        }
        let (stop_tx, stop) = watch::channel(false);
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let handled = seen.clone();
        let context = context(&bus);
        let consumed = context.consumed.clone();
        let reader = tokio::spawn(run(context, consumer, stop, move |record| {
            let seen = handled.clone();
            async move {
                let text = String::from_utf8_lossy(&record.payload).into_owned();
                let mut seen = seen.lock().unwrap();
                let tries = seen.iter().filter(|s| **s == text).count();
                seen.push(text.clone());
                match text.as_str() {
                    "retry-once" if tries == 0 => Outcome::Retry("not yet".into()),
                    "bad" => Outcome::Dead("no JSON".into()),
                    _ => Outcome::Handled,
                }
            }
        }));
        let letter = dead.next().await.unwrap();
        let letter: DeadLetter = serde_json::from_slice(&letter.payload).unwrap();
        assert_eq!(
            (letter.reason.as_str(), letter.payload.as_str()),
            ("no JSON", "bad")
        );
        while bus.lag("in", "g") > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop_tx.send(true).unwrap();
        reader.await.unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            ["retry-once", "retry-once", "bad", "good"]
        );
        assert_eq!(consumed.with_label_values(&["in", "retried"]).get(), 1);
        assert_eq!(consumed.with_label_values(&["in", "handled"]).get(), 2);
    }
}
