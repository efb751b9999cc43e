//! The gateway on the integration bus (`integrations` crate, `docs/integrations.md`).
//!
//! Out: every stored message (never a note) and every conversation change to
//! `conversation.events`; an agent's message in an SMS, WhatsApp or email conversation to
//! `outbound.sms` / `outbound.email`; a push for a participant with no live connection to
//! `notifications.push`. The shards hand events to a buffer bounded in bytes and go on: chat
//! never waits for the bus. When the bus cannot take them (Kafka down) they wait there and are
//! retried; when the buffer is full the oldest event is dropped and counted
//! (`gateway_bus_events_total{outcome="dropped"}`).
//!
//! In: `inbound.messages` (stored as the contact's `INCOMING` message in its prospect
//! conversation, fanned out like any message) and `delivery.status` (a message's delivery
//! state, forward only, told to the team in the room). Each record is committed after its
//! effect; every effect is idempotent (the provider's message id is the stored message's id);
//! a payload that does not parse goes to the dead-letter topic with the reason.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use integrations::consume::publish_until_taken;
use integrations::events::{
    self, ConversationEvent, DeliveryState, DeliveryStatus, DeviceTokenGone, InboundChannel,
    InboundMessage, OutboundEmail, OutboundSms, PushNotification, PushReason, SmsChannel,
};
use integrations::{Bus, ConsumeContext, Consumer, Outcome, PublishError, Record, Topics};
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};
use serde::Serialize;
use storage::records::{
    self, Channel, ChannelKey, Contact, ContactAddress, Conversation, Delivery, Inbox, Versioned,
};
use storage::{Direction, Message, RoomKey, RoomKind, Store, Timestamp};
use tokio::sync::{Notify, Semaphore};

use crate::auth::{Claims, Role};
use crate::cmd::{chat::Chat, Posted, RoomAction};
use crate::codec::{ErrorCode, FrameBuilder};
use crate::http::records::{open, Opening, WhenOpen};
use crate::outbox::FrameClass;
use crate::presence::UserKey;
use crate::server::Shared;
use crate::shard::{shard_of, Route, Shard, ShardCommand, Slot};

/// The code of the frames that tell the team about a message's delivery.
pub const DELIVERY_RESPONSE: &str = "delivery_response";
/// The consumer group the gateway reads its topics in.
const GROUP: &str = "gateway";
/// Deliveries the publisher awaits at once (the records themselves wait in the bus's own
/// bounded buffer).
const MAX_IN_FLIGHT: usize = 65_536;
/// [`Integration::kept`]: the bus keeps `conversation.events`.
const KEPT_EVENTS: u64 = 1;
/// [`Integration::kept`]: the bus keeps `notifications.push`.
const KEPT_PUSH: u64 = 2;
/// Events a shard hands over before it wakes the publisher even while it has more to do.
const WAKE_AFTER_EVENTS: usize = 256;
/// Characters of a message a push quotes.
const PUSH_PREVIEW_CHARS: usize = 140;

/// An event on its way to the bus.
// Messages are nearly every event: boxing them would add an allocation to each.
#[allow(clippy::large_enum_variant)]
enum Pending {
    Message {
        room: RoomKey,
        kind: RoomKind,
        message: Message,
        /// The room's participants (conversations only: the push candidates).
        participants: Vec<String>,
    },
    Change {
        room: RoomKey,
        change: &'static str,
        conversation: Box<Conversation>,
    },
}

impl Pending {
    /// What it holds, roughly, in bytes (the buffer's bound).
    fn size(&self) -> usize {
        match self {
            Pending::Message { message, .. } => 512 + message.message.len(),
            Pending::Change { .. } => 1024,
        }
    }
}

/// The bus metrics: events published and dropped, publish failures, what waits.
struct BusMetrics {
    dropped: IntCounter,
    buffered_bytes: IntGauge,
    consumed: IntCounterVec,
    /// Records of a consumed topic the gateway's group has not committed.
    consumer_lag: IntGaugeVec,
}

/// The gateway's side of the bus.
pub struct Integration {
    pub bus: Arc<dyn Bus>,
    pub topics: Topics,
    /// One buffer per shard, so that shards never wait on each other for it; each holds its
    /// share of the bound.
    buffers: Vec<Mutex<(VecDeque<Pending>, usize)>>,
    max_shard_bytes: usize,
    /// Where the publisher looks first next (it takes from the buffers in turn).
    next_buffer: AtomicUsize,
    ready: Notify,
    /// Per shard: an event went into an empty buffer and the publisher has not been woken for
    /// it yet (see [`Integration::wake_owed`]).
    wake_owed: Vec<AtomicBool>,
    /// Which topics of a stored message the bus keeps ([`KEPT_EVENTS`], [`KEPT_PUSH`]), with
    /// the bus's subscription count plus one above them: read again after a subscription.
    kept: AtomicU64,
    metrics: BusMetrics,
    settle: Arc<Settle>,
    /// Deliveries awaited at once: each holds a permit until the bus has the record.
    in_flight: Arc<Semaphore>,
    /// Whether the last send was taken (`/readyz` detail).
    healthy: AtomicBool,
}

impl Integration {
    pub fn new(
        bus: Arc<dyn Bus>,
        topics: Topics,
        max_buffer_bytes: usize,
        shards: usize,
        registry: &crate::metrics::Metrics,
    ) -> Integration {
        let events = IntCounterVec::new(
            Opts::new(
                "gateway_bus_events_total",
                "events for the bus, by outcome: published; dropped (the buffer was full: the oldest goes); rejected (the bus refused it for good)",
            ),
            &["outcome"],
        )
        .unwrap();
        let publish_failures = IntCounter::new(
            "gateway_bus_publish_failures_total",
            "sends the bus could not take for now (each is retried)",
        )
        .unwrap();
        let buffered_bytes = IntGauge::new(
            "gateway_bus_buffered_bytes",
            "bytes of events waiting for the bus",
        )
        .unwrap();
        let consumed = IntCounterVec::new(
            Opts::new(
                "gateway_bus_consumed_total",
                "records the gateway read from the bus, by topic and outcome (handled, dead_letter, retried)",
            ),
            &["topic", "outcome"],
        )
        .unwrap();
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "gateway_bus_consumer_lag",
                "records of a topic the gateway reads that its group has not committed",
            ),
            &["topic"],
        )
        .unwrap();
        for collector in [
            Box::new(events.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(publish_failures.clone()),
            Box::new(buffered_bytes.clone()),
            Box::new(consumed.clone()),
            Box::new(consumer_lag.clone()),
        ] {
            registry.register(collector);
        }
        for topic in [
            &topics.inbound_messages,
            &topics.delivery_status,
            &topics.device_tokens,
        ] {
            for outcome in ["handled", "dead_letter", "retried"] {
                consumed.with_label_values(&[topic, outcome]);
            }
        }
        Integration {
            bus,
            topics,
            buffers: (0..shards.max(1))
                .map(|_| Mutex::new((VecDeque::new(), 0)))
                .collect(),
            max_shard_bytes: max_buffer_bytes / shards.max(1),
            next_buffer: AtomicUsize::new(0),
            ready: Notify::new(),
            wake_owed: (0..shards.max(1)).map(|_| AtomicBool::new(false)).collect(),
            kept: AtomicU64::new(0),
            metrics: BusMetrics {
                dropped: events.with_label_values(&["dropped"]),
                buffered_bytes,
                consumed,
                consumer_lag,
            },
            settle: Arc::new(Settle {
                published: events.with_label_values(&["published"]),
                rejected: events.with_label_values(&["rejected"]),
                publish_failures,
            }),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            healthy: AtomicBool::new(true),
        }
    }

    /// Whether the bus is reachable and took the latest send (`/readyz` detail).
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && self.bus.healthy()
    }

    /// Bytes of events waiting in the gateway's buffer for the bus.
    pub fn buffered_bytes(&self) -> i64 {
        self.metrics.buffered_bytes.get()
    }

    fn push(&self, shard: usize, pending: Pending) {
        let size = pending.size();
        let (was_empty, queued);
        {
            let mut buffer = self.buffers[shard % self.buffers.len()]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            was_empty = buffer.0.is_empty();
            buffer.1 += size;
            buffer.0.push_back(pending);
            queued = buffer.0.len();
            while buffer.1 > self.max_shard_bytes {
                let Some(oldest) = buffer.0.pop_front() else {
                    break;
                };
                buffer.1 -= oldest.size();
                self.metrics.dropped.inc();
            }
        }
        self.metrics.buffered_bytes.add(size as i64);
        // The publisher empties the buffers before it waits, so it needs waking only for the
        // first event after that. The wake (an eventfd write that may switch to the publisher's
        // thread on a shared core) is left to the shard, which makes it once it has nothing
        // else ready: one per burst of stored messages, not one per message.
        // A shard that stays busy wakes it every WAKE_AFTER_EVENTS events all the same.
        if was_empty {
            self.wake_owed[shard % self.wake_owed.len()].store(true, Ordering::Relaxed);
        } else if queued >= WAKE_AFTER_EVENTS && self.wake_owed(shard) {
            self.wake(shard);
        }
    }

    /// Whether shard `shard` handed over events without waking the publisher for them.
    pub(crate) fn wake_owed(&self, shard: usize) -> bool {
        self.wake_owed[shard % self.wake_owed.len()].load(Ordering::Relaxed)
    }

    /// Wakes the publisher for the events shard `shard` handed over.
    pub(crate) fn wake(&self, shard: usize) {
        self.wake_owed[shard % self.wake_owed.len()].store(false, Ordering::Relaxed);
        self.ready.notify_one();
    }

    async fn pop(&self) -> Pending {
        use std::sync::atomic::Ordering;
        loop {
            let notified = self.ready.notified();
            let start = self.next_buffer.fetch_add(1, Ordering::Relaxed);
            for i in 0..self.buffers.len() {
                let index = (start + i) % self.buffers.len();
                let mut buffer = self.buffers[index]
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if let Some(pending) = buffer.0.pop_front() {
                    buffer.1 -= pending.size();
                    drop(buffer);
                    self.metrics.buffered_bytes.sub(pending.size() as i64);
                    return pending;
                }
            }
            notified.await;
        }
    }

    /// Which of [`KEPT_EVENTS`] and [`KEPT_PUSH`] the bus keeps now. Asked of the bus only
    /// after a subscription; between them it is one atomic load.
    fn kept(&self) -> u64 {
        let subscriptions = self.bus.subscriptions();
        let cached = self.kept.load(Ordering::Acquire);
        if cached >> 2 == subscriptions + 1 {
            return cached & (KEPT_EVENTS | KEPT_PUSH);
        }
        let mut kept = 0;
        if self.bus.keeps(&self.topics.conversation_events) {
            kept |= KEPT_EVENTS;
        }
        if self.bus.keeps(&self.topics.notifications_push) {
            kept |= KEPT_PUSH;
        }
        // Read against the count before it: a subscription in between only means reading again.
        self.kept
            .store(((subscriptions + 1) << 2) | kept, Ordering::Release);
        kept
    }

    /// A message was stored and announced (called on the room's shard; never waits).
    pub(crate) fn message_stored(
        &self,
        shard: usize,
        room: &RoomKey,
        kind: RoomKind,
        message: &Message,
        participants: &[String],
    ) {
        // Nothing is handed over for what would come to nothing (see `publish_message`): with
        // the in-process bus and no reader, a team chat costs the shard no copy of it.
        let kept = self.kept();
        let conversation = kind != RoomKind::Team;
        let wanted = match message.direction {
            Direction::Note => kept & KEPT_PUSH != 0 && !message.mentions.is_empty(),
            Direction::Outgoing if conversation => true,
            _ => kept & KEPT_EVENTS != 0 || (conversation && kept & KEPT_PUSH != 0),
        };
        if !wanted {
            return;
        }
        let participants = if kind == RoomKind::Team {
            Vec::new()
        } else {
            participants.to_vec()
        };
        self.push(
            shard,
            Pending::Message {
                room: room.clone(),
                kind,
                message: message.clone(),
                participants,
            },
        );
    }

    /// A conversation changed (called on the room's shard; never waits).
    pub(crate) fn conversation_changed(
        &self,
        shard: usize,
        room: &RoomKey,
        change: &'static str,
        conversation: &Conversation,
    ) {
        if self.kept() & KEPT_EVENTS == 0 {
            return;
        }
        self.push(
            shard,
            Pending::Change {
                room: room.clone(),
                change,
                conversation: Box::new(conversation.clone()),
            },
        );
    }

    /// Hands an event to the bus, backing off while the bus cannot take it, and goes on without
    /// waiting for it to be durable: many deliveries are in flight at once (a key's records
    /// keep their order on the bus) and each is settled by a task of its own.
    async fn publish(&self, topic: &str, key: &str, payload: Bytes) {
        let mut wait = Duration::from_millis(50);
        loop {
            // The semaphore is never closed.
            let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
                return;
            };
            match self.bus.send(topic, key, payload.clone()) {
                Ok(mut delivery) => {
                    use futures_util::FutureExt;
                    let settle = self.settle.clone();
                    // The in-process bus answers at once: no task for it.
                    match (&mut delivery).now_or_never() {
                        Some(result) => settle.settled(topic, key, payload, result),
                        None => {
                            let (topic, key) = (topic.to_owned(), key.to_owned());
                            let bus = self.bus.clone();
                            tokio::spawn(async move {
                                let result = delivery.await;
                                if let Err(PublishError::Unavailable(_)) = result {
                                    // The producer failed for good (a fatal error): the record
                                    // is sent anew rather than lost.
                                    settle.publish_failures.inc();
                                    publish_until_taken(bus.as_ref(), &topic, &key, payload).await;
                                    settle.published.inc();
                                } else {
                                    settle.settled(&topic, &key, payload, result);
                                }
                                drop(permit);
                            });
                        }
                    }
                    self.healthy.store(true, Ordering::Relaxed);
                    return;
                }
                Err(PublishError::Rejected(reason)) => {
                    self.settle.rejected(topic, &reason);
                    return;
                }
                Err(e) => {
                    self.settle.publish_failures.inc();
                    self.healthy.store(false, Ordering::Relaxed);
                    tracing::warn!(topic, error = %e, "the bus did not take an event; retrying");
                    drop(permit);
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Counts what became of each event handed to the bus.
struct Settle {
    published: IntCounter,
    rejected: IntCounter,
    publish_failures: IntCounter,
}

impl Settle {
    fn settled(&self, topic: &str, key: &str, payload: Bytes, result: Result<(), PublishError>) {
        match result {
            Ok(()) => self.published.inc(),
            Err(PublishError::Rejected(reason)) => self.rejected(topic, &reason),
            Err(e) => {
                // Only a bus that answers at once gets here (a full in-process topic): it has
                // not taken the record.
                self.publish_failures.inc();
                tracing::warn!(topic, key, bytes = payload.len(), error = %e, "an event was not published");
            }
        }
    }

    fn rejected(&self, topic: &str, reason: &str) {
        self.rejected.inc();
        tracing::error!(topic, reason, "the bus refused an event for good");
    }
}

/// Starts the publisher and the consumers of the gateway's topics.
pub(crate) fn start(shared: &Arc<Shared>) {
    tokio::spawn(run_publisher(shared.clone()));
    let integration = &shared.integration;
    for reads in [Reads::Inbound, Reads::Delivery, Reads::DeviceTokens] {
        // Subscribed before anything runs: the in-process bus keeps records only for a topic
        // somebody reads.
        let consumer = integration.bus.subscribe(
            reads.topic(&integration.topics),
            &integration.topics.group(GROUP),
        );
        tokio::spawn(consume(shared.clone(), reads, consumer));
    }
}

async fn run_publisher(shared: Arc<Shared>) {
    let integration = &shared.integration;
    let mut shutdown = shared.shutdown_signal();
    loop {
        let pending = tokio::select! {
            pending = integration.pop() => pending,
            _ = shutdown.changed() => return,
        };
        match pending {
            Pending::Message {
                room,
                kind,
                message,
                participants,
            } => publish_message(&shared, &room, kind, &message, &participants).await,
            Pending::Change {
                room,
                change,
                conversation,
            } => {
                let event = ConversationEvent::ConversationChanged {
                    v: events::VERSION,
                    tenant_id: room.tenant_id.clone(),
                    room_id: room.room_id.clone(),
                    change: change.to_owned(),
                    conversation: serde_json::to_value(&*conversation).unwrap_or_default(),
                };
                let topic = &integration.topics.conversation_events;
                integration
                    .publish(topic, &room.room_id, events::encode(&event))
                    .await;
            }
        }
    }
}

async fn publish_message(
    shared: &Shared,
    room: &RoomKey,
    kind: RoomKind,
    message: &Message,
    participants: &[String],
) {
    let integration = &shared.integration;
    let topics = &integration.topics;
    // Notes stay inside: no topic carries them; a mention pushes the conversation's name only.
    if message.direction == Direction::Note {
        for user in &message.mentions {
            push(shared, room, message, user, PushReason::Mention).await;
        }
        return;
    }
    // Built only when the bus keeps it for someone (with no Kafka and no in-process reader of
    // the topic, nobody ever would).
    let kept = integration.kept();
    if kept & KEPT_EVENTS != 0 {
        let event = MessageCreated::new(room, message);
        integration
            .publish(
                &topics.conversation_events,
                &room.room_id,
                events::encode(&event),
            )
            .await;
    }
    if kind == RoomKind::Team {
        return;
    }
    if kept & KEPT_PUSH != 0 {
        for user in participants.iter().filter(|p| **p != message.sender) {
            push(shared, room, message, user, PushReason::Message).await;
        }
    }
    if message.direction == Direction::Outgoing {
        outbound(shared, room, message).await;
    }
}

/// [`ConversationEvent::MessageCreated`] as it is sent: serialized straight from the stored
/// message, with no JSON tree built in between (the tests check that it reads back as one).
#[derive(Serialize)]
#[serde(tag = "type", rename = "message.created")]
struct MessageCreated<'a> {
    v: u32,
    tenant_id: &'a str,
    room_id: &'a str,
    message: &'a Message,
}

impl<'a> MessageCreated<'a> {
    fn new(room: &'a RoomKey, message: &'a Message) -> Self {
        MessageCreated {
            v: events::VERSION,
            tenant_id: &room.tenant_id,
            room_id: &room.room_id,
            message,
        }
    }
}

/// What a push is titled: its conversation's title (a contact's name, an email's subject, or
/// what the team set), else the room's title, else its id. Read only for a push that goes out.
async fn push_title(shared: &Shared, room: &RoomKey) -> String {
    let store = &shared.store;
    match records::load::<Conversation, _>(store, &room.tenant_id, &room.room_id).await {
        Ok(Some(conversation)) => return conversation.value.title,
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "a push's conversation could not be read"),
    }
    match store.room(room).await {
        Ok(Some(found)) if !found.title.is_empty() => found.title,
        _ => room.room_id.clone(),
    }
}

/// A push for `user` when it has no live connection.
async fn push(shared: &Shared, room: &RoomKey, message: &Message, user: &str, reason: PushReason) {
    let key = UserKey {
        tenant: room.tenant_id.clone(),
        user_id: user.to_owned(),
    };
    if !shared.presence.connections(&key).is_empty() {
        return;
    }
    let devices = match crate::http::devices::user_devices(shared, &room.tenant_id, user).await {
        Ok(devices) => devices,
        Err(e) => {
            tracing::warn!(error = %e, user, "a user's devices could not be read; no push");
            return;
        }
    };
    // Nowhere to push to.
    if devices.is_empty() {
        return;
    }
    let body = match reason {
        PushReason::Mention => format!("{} mentioned you", message.sender),
        PushReason::Message => message.message.chars().take(PUSH_PREVIEW_CHARS).collect(),
    };
    let notification = PushNotification {
        v: events::VERSION,
        tenant_id: room.tenant_id.clone(),
        user_id: user.to_owned(),
        room_id: room.room_id.clone(),
        message_id: message.message_id.clone(),
        reason,
        title: push_title(shared, room).await,
        body,
        device_tokens: devices.into_iter().map(|d| d.token).collect(),
    };
    let integration = &shared.integration;
    integration
        .publish(
            &integration.topics.notifications_push,
            &room.room_id,
            events::encode(&notification),
        )
        .await;
}

/// An agent's message in an SMS, WhatsApp or email conversation goes to its worker.
async fn outbound(shared: &Shared, room: &RoomKey, message: &Message) {
    let store = &shared.store;
    let tenant = room.tenant_id.as_str();
    let load = async {
        let Some(conversation) =
            records::load::<Conversation, _>(store, tenant, &room.room_id).await?
        else {
            return Ok(None);
        };
        let conversation = conversation.value;
        let (Some(inbox_id), Some(contact_id)) = (&conversation.inbox_id, &conversation.contact_id)
        else {
            return Ok(None);
        };
        let inbox = records::load::<Inbox, _>(store, tenant, inbox_id).await?;
        let contact = records::load::<Contact, _>(store, tenant, contact_id).await?;
        Ok::<_, storage::Error>(
            inbox
                .zip(contact)
                .map(|(i, c)| (conversation, i.value, c.value)),
        )
    };
    let (conversation, inbox, contact) = match load.await {
        Ok(Some(found)) => found,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, "an outbound message's conversation could not be read; not sent");
            return;
        }
    };
    let topics = &shared.integration.topics;
    let media_urls: Vec<String> = message
        .attached_files
        .iter()
        .filter(|f| f.starts_with("https://") || f.starts_with("http://"))
        .cloned()
        .collect();
    let (topic, payload) = match (&inbox.channel, &contact) {
        (
            Channel::Sms { phone_number },
            Contact {
                phone: Some(to), ..
            },
        )
        | (
            Channel::Whatsapp { phone_number },
            Contact {
                phone: Some(to), ..
            },
        ) => {
            let channel = match inbox.channel {
                Channel::Whatsapp { .. } => SmsChannel::Whatsapp,
                _ => SmsChannel::Sms,
            };
            let sms = OutboundSms {
                v: events::VERSION,
                tenant_id: tenant.to_owned(),
                room_id: room.room_id.clone(),
                message_id: message.message_id.clone(),
                channel,
                from: phone_number.clone(),
                to: to.clone(),
                body: message.message.clone(),
                media_urls,
            };
            (&topics.outbound_sms, events::encode(&sms))
        }
        (
            Channel::Email { address },
            Contact {
                email: Some(to), ..
            },
        ) => {
            let email = OutboundEmail {
                v: events::VERSION,
                tenant_id: tenant.to_owned(),
                room_id: room.room_id.clone(),
                message_id: message.message_id.clone(),
                from: address.clone(),
                from_name: Some(inbox.name.clone()).filter(|name| !name.trim().is_empty()),
                to: to.clone(),
                subject: reply_subject(&conversation.title),
                text: message.message.clone(),
                in_reply_to: None,
                references: Vec::new(),
            };
            (&topics.outbound_email, events::encode(&email))
        }
        _ => return,
    };
    let key = room.room_id.clone();
    shared.integration.publish(topic, &key, payload).await;
    // Queued: the worker moves it on.
    let status = DeliveryStatus {
        v: events::VERSION,
        tenant_id: tenant.to_owned(),
        room_id: room.room_id.clone(),
        message_id: message.message_id.clone(),
        status: DeliveryState::Queued,
        provider_id: None,
        error_code: None,
        error_message: None,
    };
    if let Err(e) = apply_delivery(shared, &status).await {
        tracing::warn!(error = %e, "a queued delivery state could not be saved");
    }
}

/// The topics the gateway reads.
#[derive(Clone, Copy)]
enum Reads {
    Inbound,
    Delivery,
    DeviceTokens,
}

impl Reads {
    fn topic(self, topics: &Topics) -> &str {
        match self {
            Reads::Inbound => &topics.inbound_messages,
            Reads::Delivery => &topics.delivery_status,
            Reads::DeviceTokens => &topics.device_tokens,
        }
    }
}

/// Reads one of the gateway's topics until shutdown.
async fn consume(shared: Arc<Shared>, reads: Reads, consumer: Box<dyn Consumer>) {
    let integration = &shared.integration;
    let topics = &integration.topics;
    let topic = reads.topic(topics);
    let context = ConsumeContext {
        bus: integration.bus.clone(),
        dead_letters: topics.dead_letters.clone(),
        consumed: integration.metrics.consumed.clone(),
        lag: integration.metrics.consumer_lag.with_label_values(&[topic]),
        max_backoff: Duration::from_secs(10),
    };
    let stop = shared.shutdown_signal();
    let handler = &shared;
    integrations::consume::run(context, consumer, stop, |record| async move {
        match reads {
            Reads::Inbound => handle_inbound(handler, &record).await,
            Reads::Delivery => handle_delivery(handler, &record).await,
            Reads::DeviceTokens => handle_device_token(handler, &record).await,
        }
    })
    .await;
}

/// The push service no longer knows a device token: the user's devices forget it.
async fn handle_device_token(shared: &Arc<Shared>, record: &Record) -> Outcome {
    let gone: DeviceTokenGone = match events::decode(&record.payload) {
        Ok(gone) => gone,
        Err(e) => return Outcome::Dead(e.to_string()),
    };
    match crate::http::devices::forget(shared, &gone.tenant_id, &gone.user_id, &gone.token).await {
        Ok(_) => Outcome::Handled,
        Err(e) => Outcome::Retry(format!("forgetting a device token: {e}")),
    }
}

/// The subject of a reply in a conversation titled `title`: `Re: title`, once.
fn reply_subject(title: &str) -> String {
    let answered = title
        .get(..3)
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case("re:"));
    if answered {
        title.to_owned()
    } else {
        format!("Re: {title}")
    }
}

/// The id an inbound message is stored under: the provider's, made to fit a message id
/// (1–64 bytes) when it is longer (an email's `Message-ID`).
fn inbound_message_id(provider_id: &str) -> String {
    if !provider_id.is_empty() && provider_id.len() <= 64 {
        return provider_id.to_owned();
    }
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(provider_id.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("in-{}", &hex[..48])
}

async fn handle_inbound(shared: &Arc<Shared>, record: &Record) -> Outcome {
    let inbound: InboundMessage = match events::decode(&record.payload) {
        Ok(inbound) => inbound,
        Err(e) => return Outcome::Dead(e.to_string()),
    };
    let store = &shared.store;
    let channel = match inbound.channel {
        InboundChannel::Sms => Channel::Sms {
            phone_number: inbound.to.clone(),
        },
        InboundChannel::Whatsapp => Channel::Whatsapp {
            phone_number: inbound.to.clone(),
        },
        InboundChannel::Email => Channel::Email {
            address: inbound.to.clone(),
        },
    };
    let retry = |e: storage::Error| Outcome::Retry(e.to_string());
    let key =
        match records::load::<ChannelKey, _>(store, ChannelKey::TENANT, &ChannelKey::id(&channel))
            .await
        {
            Ok(Some(key)) => key.value,
            Ok(None) => return Outcome::Dead(format!("no inbox receives at {:?}", inbound.to)),
            Err(e) => return retry(e),
        };
    let tenant = key.tenant_id.as_str();
    match records::load::<Inbox, _>(store, tenant, &key.inbox_id).await {
        Ok(Some(inbox)) if ChannelKey::id(&inbox.value.channel) == ChannelKey::id(&channel) => {}
        Ok(_) => return Outcome::Dead(format!("no inbox receives at {:?}", inbound.to)),
        Err(e) => return retry(e),
    }
    let contact = match contact_of(shared, tenant, &inbound).await {
        Ok(contact) => contact,
        Err(outcome) => return outcome,
    };
    let claims = Claims {
        sub: contact.contact_id.clone(),
        tenant: tenant.to_owned(),
        role: Role::Customer,
        exp: u64::MAX,
        name: Some(contact.name.clone()),
        aud: None,
        iss: None,
    };
    let opened = open(
        shared,
        &claims,
        Opening {
            room_id: None,
            kind: RoomKind::Prospect,
            contact: Some(contact.clone()),
            inbox_id: Some(key.inbox_id.clone()),
            // A mail's conversation is called by its subject (so replies say `Re:` it); a
            // reopened one keeps its first title.
            title: match inbound.channel {
                InboundChannel::Email => inbound
                    .subject
                    .as_deref()
                    .map(str::trim)
                    .filter(|s| !s.is_empty() && s.len() <= 256)
                    .map(str::to_owned),
                _ => None,
            },
            participants: vec![contact.contact_id.clone()],
            when_open: WhenOpen::Reopen,
        },
    )
    .await;
    let room_id = match opened {
        Ok(opened) => opened.conversation.room_id,
        Err(e) if e.status.is_server_error() => return Outcome::Retry(e.message),
        Err(e) => return Outcome::Dead(e.message),
    };
    let mut metadata = serde_json::Map::new();
    metadata.insert(
        "inbound".to_owned(),
        serde_json::json!({
            "channel": inbound.channel,
            "provider_id": inbound.provider_id,
            "from": inbound.from,
            "subject": inbound.subject,
            "attachments": inbound.attachments,
        }),
    );
    let text = if inbound.text.is_empty() && !inbound.attachments.is_empty() {
        "(attachment)".to_owned()
    } else {
        inbound.text
    };
    if text.len() > crate::cmd::chat::MAX_TEXT_BYTES {
        return Outcome::Dead("the message is longer than 16384 bytes".to_owned());
    }
    let chat = Chat {
        message: text,
        message_id: Some(inbound_message_id(&inbound.provider_id)),
        attached_files: Vec::new(),
        reply_to: None,
        kind: storage::MessageType::Text,
        metadata,
    };
    let action = RoomAction::Post(Posted::Chat(chat));
    match crate::http::call::room(shared, Arc::new(claims), &room_id, action).await {
        Ok(_) => Outcome::Handled,
        Err(e) if e.code == ErrorCode::Unavailable => Outcome::Retry(e.message),
        // A redelivery of a stored message answers it again: handled.
        Err(e) => Outcome::Dead(e.message),
    }
}

/// The contact an inbound message is from: found by its number or address, or made now.
async fn contact_of(
    shared: &Shared,
    tenant: &str,
    inbound: &InboundMessage,
) -> Result<Contact, Outcome> {
    let store = &shared.store;
    let retry = |e: storage::Error| Outcome::Retry(e.to_string());
    let address = match inbound.channel {
        InboundChannel::Email => ContactAddress::email(&inbound.from),
        _ => ContactAddress::phone(&inbound.from),
    };
    let existing = records::load::<ContactAddress, _>(store, tenant, &address)
        .await
        .map_err(retry)?;
    if let Some(pointer) = existing {
        if let Some(contact) = records::load::<Contact, _>(store, tenant, &pointer.value.contact_id)
            .await
            .map_err(retry)?
        {
            return Ok(contact.value);
        }
    }
    let (email, phone) = match inbound.channel {
        InboundChannel::Email => (Some(inbound.from.clone()), None),
        _ => (None, Some(inbound.from.clone())),
    };
    let contact = Contact {
        contact_id: ulid::Ulid::new().to_string(),
        name: inbound
            .from_name
            .clone()
            .filter(|n| !n.is_empty() && n.len() <= 256)
            .unwrap_or_else(|| inbound.from.clone()),
        email,
        phone,
        avatar_url: None,
        external_ids: Default::default(),
        custom_attributes: Default::default(),
        created_at: Timestamp::now(),
    };
    // The pointer first: of two messages racing from a new number, one makes the contact.
    let claim = Versioned {
        value: ContactAddress {
            contact_id: contact.contact_id.clone(),
        },
        version: 0,
    };
    match records::save(store, tenant, &address, claim).await {
        Ok(_) => {}
        Err(storage::Error::VersionConflict { .. }) => {
            return Err(Outcome::Retry(
                "the contact is being made by another message".into(),
            ))
        }
        Err(e) => return Err(retry(e)),
    }
    crate::http::records::save_contact(shared, tenant, contact)
        .await
        .map(|(contact, _)| contact)
        .map_err(|e| Outcome::Retry(e.message))
}

/// Moves a message's delivery state forward; `Ok(Some)` with the new state when it moved.
async fn apply_delivery(
    shared: &Shared,
    status: &DeliveryStatus,
) -> Result<Option<Delivery>, storage::Error> {
    let id = Delivery::id(&status.room_id, &status.message_id);
    let mut moved = false;
    let saved =
        records::update::<Delivery, _, _>(&shared.store, &status.tenant_id, &id, |current| {
            let state = current.and_then(|c| {
                serde_json::from_value::<DeliveryState>(serde_json::Value::String(c.status.clone()))
                    .ok()
            });
            moved = state.is_none_or(|state| state.may_become(status.status));
            if !moved {
                return Ok(None);
            }
            Ok(Some(Delivery {
                status: status.status.as_str().to_owned(),
                provider_id: status
                    .provider_id
                    .clone()
                    .or_else(|| current.and_then(|c| c.provider_id.clone())),
                error_code: status.error_code.clone(),
                error_message: status.error_message.clone(),
                updated_at: Timestamp::now(),
            }))
        })
        .await?;
    Ok(saved.filter(|_| moved).map(|s| s.value))
}

#[derive(Serialize)]
struct DeliveryData<'a> {
    message_id: &'a str,
    status: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_message: Option<&'a str>,
}

async fn handle_delivery(shared: &Arc<Shared>, record: &Record) -> Outcome {
    let status: DeliveryStatus = match events::decode(&record.payload) {
        Ok(status) => status,
        Err(e) => return Outcome::Dead(e.to_string()),
    };
    let moved = match apply_delivery(shared, &status).await {
        Ok(moved) => moved,
        Err(e) => return Outcome::Retry(e.to_string()),
    };
    if let Some(delivery) = moved {
        tell_team(shared, &status, &delivery);
    }
    Outcome::Handled
}

/// Tells the team members in the room (if it is loaded) about a delivery state.
fn tell_team(shared: &Shared, status: &DeliveryStatus, delivery: &Delivery) {
    let room = RoomKey::new(&status.tenant_id, &status.room_id);
    let frame = FrameBuilder::success(
        DELIVERY_RESPONSE,
        "system",
        Some(&room.room_id),
        None,
        DeliveryData {
            message_id: &status.message_id,
            status: &delivery.status,
            provider_id: delivery.provider_id.as_deref(),
            error_code: delivery.error_code.as_deref(),
            error_message: delivery.error_message.as_deref(),
        },
    );
    let shard = &shared.shards[shard_of(&room, shared.shards.len())];
    let work = ShardCommand::Run(Box::new(move |shard: &mut Shard| {
        shard.tell_team(&room, &frame);
    }));
    if shard.commands.try_send(work).is_err() {
        tracing::warn!("a delivery event was dropped: the room's shard is overloaded");
    }
}

impl Shard {
    /// Sends `frame` to the room's team members (agents and admins), if the room is loaded.
    pub(crate) fn tell_team(&mut self, room: &RoomKey, frame: &Bytes) {
        let Some(Slot::Ready(state)) = self.rooms.get_mut(room) else {
            return;
        };
        let route = Route::new(&self.shared.shards, self.index);
        let members = state
            .members
            .values_mut()
            .filter(|m| m.conn.claims.role.sees_notes());
        let n = route.broadcast(&mut self.lists, members, frame, FrameClass::Durable);
        self.shared.metrics.deliveries.inc_by(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use storage::NewMessage;

    #[tokio::test]
    async fn what_the_bus_keeps_is_read_again_after_each_subscription() {
        let bus = integrations::InProcessBus::new(1 << 20);
        let topics = Topics::default();
        let metrics = crate::metrics::Metrics::new(1);
        let integration = Integration::new(bus.clone(), topics.clone(), 1 << 20, 1, &metrics);
        let room = RoomKey {
            tenant_id: "acme".into(),
            room_id: "r".into(),
        };
        let message = storage::NewMessage::text(&room, 1, "alice", "hi").into_message();
        let stored = || integration.message_stored(0, &room, RoomKind::Team, &message, &[]);
        assert_eq!(integration.kept(), 0);
        stored();
        assert_eq!(
            integration.buffered_bytes(),
            0,
            "no reader: nothing handed over"
        );

        let _push = bus.subscribe(&topics.notifications_push, "push");
        assert_eq!(integration.kept(), KEPT_PUSH);
        stored();
        assert_eq!(
            integration.buffered_bytes(),
            0,
            "a team chat pushes nothing"
        );

        let _events = bus.subscribe(&topics.conversation_events, "audit");
        assert_eq!(integration.kept(), KEPT_EVENTS | KEPT_PUSH);
        stored();
        assert!(
            integration.buffered_bytes() > 0,
            "a reader of the events gets it"
        );
    }

    #[test]
    fn message_created_reads_back_as_the_conversation_event() {
        let room = RoomKey {
            tenant_id: "acme".into(),
            room_id: "r \"1\"".into(),
        };
        let mut message =
            NewMessage::text(&room, 7, "alice", "hi \u{1F600} \"there\"").into_message();
        message.mentions = vec!["bob".into()];
        let sent = events::encode(&MessageCreated::new(&room, &message));
        let read: ConversationEvent = events::decode(&sent).unwrap();
        assert_eq!(
            read,
            ConversationEvent::MessageCreated {
                v: events::VERSION,
                tenant_id: room.tenant_id.clone(),
                room_id: room.room_id.clone(),
                message: serde_json::to_value(&message).unwrap(),
            }
        );
    }
}
