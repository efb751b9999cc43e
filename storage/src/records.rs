//! The inbox domain's records — contacts, inboxes with their channel, conversations — kept as
//! versioned JSON documents.
//!
//! A backend stores any record through two primitives of [`Store`]: [`Store::record`] reads one
//! and [`Store::put_record`] writes one if nobody wrote it since it was read (compare-and-set on
//! [`Record::version`]). Everything typed lives here, once for every backend: [`Versioned`]
//! wraps a record's body with its version, and [`load`] / [`save`] / [`update`] move typed
//! records through the primitives. Management writes are rare next to messages, so one
//! document per record (read, change, write back) is the simple shape that fits both the
//! embedded engine and a wide-column store; nothing here runs per chat message of a team
//! room.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::model::{RoomKind, SenderType, Timestamp};
use crate::{Direction, Error, Result, RoomKey, Store};

string_enum!(
/// What a record is; part of its key. `contact_conversation`: the conversation of a
/// contact and kind (`<contact_id>/<kind>` → its room id), how a second prospect
/// conversation for the same contact finds the first.
RecordKind {
    Contact => "contact",
    Inbox => "inbox",
    Conversation => "conversation",
    ContactConversation => "contact_conversation",
    Snooze => "snooze",
    QueueEntry => "queue_entry",
    ChannelKey => "channel_key",
    File => "file",
    FileLimits => "file_limits",
    ContactAddress => "contact_address",
    Delivery => "delivery",
    Devices => "devices",
});

/// Where a record is stored: records of one tenant never meet another tenant's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordKey {
    pub tenant_id: String,
    pub kind: RecordKind,
    pub id: String,
}

impl RecordKey {
    pub fn new(tenant_id: &str, kind: RecordKind, id: &str) -> Self {
        RecordKey {
            tenant_id: tenant_id.to_owned(),
            kind,
            id: id.to_owned(),
        }
    }
}

/// A stored record: its body is a JSON document the typed layer (de)serializes.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub key: RecordKey,
    /// 1 for the first write, one more for each later one. [`Store::put_record`] writes a record
    /// only over the version before it (`version - 1`; 0: the record must not exist yet).
    pub version: u64,
    /// The document, serialized JSON.
    pub body: String,
    pub updated_at: Timestamp,
    /// Where the record sits in its kind's list ([`Store::list_records`]), for kinds that are
    /// listed (conversations: by last activity, in milliseconds); `None` keeps it out.
    pub list_key: Option<i64>,
}

/// How long a list keeps the places records had before they moved, in milliseconds: a walk
/// through a list (pages read at one [`ListQuery::as_of`]) must end within this time.
pub const LIST_SNAPSHOT_MILLIS: i64 = 5 * 60 * 1000;

/// One page of a kind's list ([`Store::list_records`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ListQuery {
    /// The list as it was at this time: a record that moved later is listed at its place then,
    /// and one listed later is left out, so a walk over pages read at one `as_of` sees every
    /// record listed then exactly once while records keep moving. `None`: the list as it is
    /// now; the page names the time it was read at ([`ListPage::as_of`]), for the next pages.
    pub as_of: Option<Timestamp>,
    /// Largest keys first (`false`: smallest first).
    pub descending: bool,
    /// Start after this place (`(list_key, id)`), exclusive; `None` from the start.
    pub after: Option<(i64, String)>,
    /// Most entries returned.
    pub limit: u32,
}

/// A page of a list.
#[derive(Debug, Clone, PartialEq)]
pub struct ListPage {
    /// The time the list was read at: the query's, or, for a query without one, a time that
    /// covers every write the store had finished and none it had not, so that the pages read at
    /// it later agree with this one.
    pub as_of: Timestamp,
    pub entries: Vec<Listed>,
}

/// A listed record with the place it had at the query's `as_of`.
#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    pub list_key: i64,
    pub record: Record,
}

/// Largest record body a backend takes, in bytes.
pub const MAX_RECORD_BYTES: usize = 256 * 1024;

/// A typed record body.
pub trait RecordBody: Serialize + DeserializeOwned {
    const KIND: RecordKind;

    /// Its place in its kind's list, when the kind is listed.
    fn list_key(&self) -> Option<i64> {
        None
    }
}

/// A typed record with the version it was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    /// The stored version (0: not stored yet).
    pub version: u64,
}

/// Reads a typed record.
pub async fn load<T: RecordBody, S: Store>(
    store: &S,
    tenant_id: &str,
    id: &str,
) -> Result<Option<Versioned<T>>> {
    let key = RecordKey::new(tenant_id, T::KIND, id);
    let Some(record) = store.record(&key).await? else {
        return Ok(None);
    };
    let value = serde_json::from_str(&record.body).map_err(|e| {
        Error::Schema(format!(
            "stored {} {id:?} is not readable: {e}",
            T::KIND.as_str()
        ))
    })?;
    Ok(Some(Versioned {
        value,
        version: record.version,
    }))
}

/// Writes a typed record over the version it was read at (0: a new record); returns it with
/// its new version, or [`Error::VersionConflict`] when someone else wrote it since.
pub async fn save<T: RecordBody, S: Store>(
    store: &S,
    tenant_id: &str,
    id: &str,
    record: Versioned<T>,
) -> Result<Versioned<T>> {
    let body = serde_json::to_string(&record.value)
        .map_err(|e| Error::Invalid(format!("{} is not serializable: {e}", T::KIND.as_str())))?;
    let stored = store
        .put_record(Record {
            key: RecordKey::new(tenant_id, T::KIND, id),
            version: record.version + 1,
            body,
            updated_at: Timestamp::now(),
            list_key: record.value.list_key(),
        })
        .await?;
    Ok(Versioned {
        value: record.value,
        version: stored.version,
    })
}

/// Most read-change-write rounds [`update`] tries before it gives up on a record others keep
/// writing.
pub const MAX_UPDATE_ROUNDS: usize = 8;

/// Reads a record, applies `change` and writes it back, again from a fresh read when another
/// writer got there first. `change` sees `None` for a record that does not exist; it returns
/// the record to write, or `None` to write nothing (the result is then the record as read).
pub async fn update<T, S, F>(
    store: &S,
    tenant_id: &str,
    id: &str,
    mut change: F,
) -> Result<Option<Versioned<T>>>
where
    T: RecordBody + Clone,
    S: Store,
    F: FnMut(Option<&T>) -> Result<Option<T>>,
{
    for _ in 0..MAX_UPDATE_ROUNDS {
        let current = load::<T, S>(store, tenant_id, id).await?;
        let version = current.as_ref().map_or(0, |c| c.version);
        let Some(next) = change(current.as_ref().map(|c| &c.value))? else {
            return Ok(current);
        };
        match save(
            store,
            tenant_id,
            id,
            Versioned {
                value: next,
                version,
            },
        )
        .await
        {
            Ok(saved) => return Ok(Some(saved)),
            Err(Error::VersionConflict { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Error::NotApplied(format!(
        "{} {id:?} changed under every one of {MAX_UPDATE_ROUNDS} attempts",
        T::KIND.as_str()
    )))
}

// ---------------------------------------------------------------------------------------------
// Contacts

/// A customer or prospect the team talks to (over the web widget, SMS, email, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Contact {
    pub contact_id: String,
    pub name: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
    #[serde(default)]
    pub avatar_url: Option<String>,
    /// Ids of the contact in other systems (`{"crm": "42"}`).
    #[serde(default)]
    pub external_ids: BTreeMap<String, String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub custom_attributes: serde_json::Map<String, serde_json::Value>,
    pub created_at: Timestamp,
}

impl RecordBody for Contact {
    const KIND: RecordKind = RecordKind::Contact;

    /// Contacts are listed by when they were created.
    fn list_key(&self) -> Option<i64> {
        Some(self.created_at.0)
    }
}

// ---------------------------------------------------------------------------------------------
// Inboxes

/// How an inbox reaches its contacts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Channel {
    WebWidget {
        widget_key: String,
        #[serde(default)]
        brand_color: Option<String>,
        /// Origins the widget may be embedded on.
        #[serde(default)]
        authorized_domains: Vec<String>,
    },
    Sms {
        /// The Twilio number messages are sent from.
        phone_number: String,
    },
    Whatsapp {
        phone_number: String,
    },
    Email {
        address: String,
    },
}

/// A team inbox: where conversations of one channel arrive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Inbox {
    pub inbox_id: String,
    pub name: String,
    pub channel: Channel,
    pub created_at: Timestamp,
}

impl RecordBody for Inbox {
    const KIND: RecordKind = RecordKind::Inbox;

    /// Inboxes are listed by when they were created.
    fn list_key(&self) -> Option<i64> {
        Some(self.created_at.0)
    }
}

// ---------------------------------------------------------------------------------------------
// Conversations

string_enum!(
/// Where a conversation is in its life cycle.
ConversationStatus {
    New => "new",
    Active => "active",
    Ai => "ai",
    Queued => "queued",
    Agent => "agent",
    Escalated => "escalated",
    Ended => "ended",
    Closed => "closed",
});

string_enum!(
Priority {
    Low => "low",
    Medium => "medium",
    High => "high",
    Urgent => "urgent",
});

string_enum!(
RatingScore {
    Good => "good",
    Bad => "bad",
});

/// The latest message of a conversation, as an inbox list shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LastMessage {
    pub seq: u64,
    pub message_id: String,
    pub sender: String,
    pub sender_type: SenderType,
    pub direction: Direction,
    /// The first characters of the text.
    pub preview: String,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Rating {
    pub score: RatingScore,
    #[serde(default)]
    pub comment: Option<String>,
    pub rated_at: Timestamp,
}

/// Counters and milestones of a conversation (its metrics).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConversationMetrics {
    /// Messages by sender type (`customer`, `agent`, …), notes not included.
    #[serde(default)]
    pub messages: BTreeMap<String, u64>,
    #[serde(default)]
    pub notes: u64,
    #[serde(default)]
    pub queued_at: Option<Timestamp>,
    #[serde(default)]
    pub agent_joined_at: Option<Timestamp>,
    #[serde(default)]
    pub first_reply_at: Option<Timestamp>,
    #[serde(default)]
    pub ended_at: Option<Timestamp>,
    #[serde(default)]
    pub end_reason: Option<String>,
    /// Why it was last escalated (`escalate`'s `reason`).
    #[serde(default)]
    pub escalation_reason: Option<String>,
    /// Time spent waiting in the support queue, all turns added up (milliseconds).
    #[serde(default)]
    pub queue_ms: u64,
    /// From the first contact/customer message the team had not answered to the team's first
    /// answer (milliseconds).
    #[serde(default)]
    pub first_reply_ms: Option<u64>,
    /// From the first agent taking it to its end (milliseconds).
    #[serde(default)]
    pub handle_ms: Option<u64>,
}

/// What became of a conversation's message, as its `delivery` field says: stored (`sent`),
/// received by a connection or device of the side it is for (`delivered`), read there
/// (`read`), or refused by the provider that was to carry it (`failed`). Only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageDelivery {
    Sent,
    Failed,
    Delivered,
    Read,
}

impl MessageDelivery {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageDelivery::Sent => "sent",
            MessageDelivery::Failed => "failed",
            MessageDelivery::Delivered => "delivered",
            MessageDelivery::Read => "read",
        }
    }

    /// A provider's state of an outbound message ([`Delivery::status`]) as a message's.
    pub fn of_provider(status: &str) -> Option<MessageDelivery> {
        match status {
            "queued" | "sent" => Some(MessageDelivery::Sent),
            "delivered" => Some(MessageDelivery::Delivered),
            "read" => Some(MessageDelivery::Read),
            "failed" | "undelivered" => Some(MessageDelivery::Failed),
            _ => None,
        }
    }
}

/// How far one side of a conversation (its customer or contact, or its team) has received and
/// read the other side's messages: every message for that side up to these seqs is
/// `delivered` / `read`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SeqMarks {
    #[serde(default)]
    pub delivered_seq: u64,
    #[serde(default)]
    pub read_seq: u64,
}

impl SeqMarks {
    /// Received up to `seq` (never back).
    pub fn delivered(&mut self, seq: u64) -> bool {
        let moved = seq > self.delivered_seq;
        self.delivered_seq = self.delivered_seq.max(seq);
        moved
    }

    /// Read (and so received) up to `seq` (never back).
    pub fn read(&mut self, seq: u64) -> bool {
        self.delivered(seq);
        let moved = seq > self.read_seq;
        self.read_seq = self.read_seq.max(seq);
        moved
    }

    fn merge(&mut self, other: SeqMarks) {
        self.delivered(other.delivered_seq);
        self.read(other.read_seq);
    }

    fn state_of(&self, seq: u64) -> MessageDelivery {
        if seq <= self.read_seq {
            MessageDelivery::Read
        } else if seq <= self.delivered_seq {
            MessageDelivery::Delivered
        } else {
            MessageDelivery::Sent
        }
    }
}

/// Each side's [`SeqMarks`]: where a conversation's messages' `delivery` comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeliveryMarks {
    /// How far the customer or contact has the team's messages.
    #[serde(default)]
    pub contact: SeqMarks,
    /// How far the team has the customer's or contact's messages (and its own notes).
    #[serde(default)]
    pub team: SeqMarks,
}

impl DeliveryMarks {
    /// The side a message is for: the team (`true`) for a customer's or contact's message and
    /// for a note, the customer or contact for the team's; none in a team room.
    pub fn for_team(direction: Direction) -> Option<bool> {
        match direction {
            Direction::Incoming | Direction::Note => Some(true),
            Direction::Outgoing => Some(false),
            Direction::Internal => None,
        }
    }

    /// One side's marks: the team's (`true`) or the customer's/contact's.
    pub fn side(&mut self, team: bool) -> &mut SeqMarks {
        if team {
            &mut self.team
        } else {
            &mut self.contact
        }
    }

    /// Both marks moved to the later of the two (marks never move back).
    pub fn merge(&mut self, other: &DeliveryMarks) {
        self.contact.merge(other.contact);
        self.team.merge(other.team);
    }

    /// A message's state as the marks of the side it is for tell it (none in a team room).
    pub fn state_of(&self, direction: Direction, seq: u64) -> Option<MessageDelivery> {
        let team = Self::for_team(direction)?;
        let side = if team { &self.team } else { &self.contact };
        Some(side.state_of(seq))
    }
}

/// A conversation's inbox state; the conversation's messages and participants are its room's
/// (same tenant and id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Conversation {
    pub room_id: String,
    /// `support` or `prospect`.
    pub kind: RoomKind,
    #[serde(default)]
    pub contact_id: Option<String>,
    #[serde(default)]
    pub inbox_id: Option<String>,
    pub title: String,
    #[serde(default)]
    pub image_url: Option<String>,
    #[serde(default)]
    pub assignee: Option<String>,
    pub status: ConversationStatus,
    pub is_open: bool,
    #[serde(default)]
    pub snoozed_until: Option<Timestamp>,
    #[serde(default)]
    pub show_on_top: bool,
    #[serde(default)]
    pub archived: bool,
    #[serde(default)]
    pub priority: Option<Priority>,
    #[serde(default)]
    pub labels: Vec<String>,
    pub last_activity_at: Timestamp,
    #[serde(default)]
    pub last_message: Option<LastMessage>,
    #[serde(default)]
    pub contact_last_seen_at: Option<Timestamp>,
    #[serde(default)]
    pub agent_last_seen_at: Option<Timestamp>,
    /// Since when the contact has been waiting for an answer (unset once the team replied).
    #[serde(default)]
    pub waiting_since: Option<Timestamp>,
    #[serde(default)]
    pub rating: Option<Rating>,
    #[serde(default)]
    pub metrics: ConversationMetrics,
    /// How far each side has received and read the other's messages.
    #[serde(default)]
    pub delivery: DeliveryMarks,
    pub created_at: Timestamp,
}

impl RecordBody for Conversation {
    const KIND: RecordKind = RecordKind::Conversation;

    /// Conversations are listed by last activity (an inbox, newest first).
    fn list_key(&self) -> Option<i64> {
        Some(self.last_activity_at.0)
    }
}

impl Conversation {
    /// Open and `queued` or `escalated`: in its tenant's support queue, waiting for an agent.
    pub fn waits_for_agent(&self) -> bool {
        self.is_open
            && matches!(
                self.status,
                ConversationStatus::Queued | ConversationStatus::Escalated
            )
    }

    /// A new open conversation in `room`, titled and pictured after its contact when it has one.
    pub fn new(room: &RoomKey, kind: RoomKind, contact: Option<&Contact>) -> Conversation {
        let now = Timestamp::now();
        Conversation {
            room_id: room.room_id.clone(),
            kind,
            contact_id: contact.map(|c| c.contact_id.clone()),
            inbox_id: None,
            title: contact.map_or_else(|| room.room_id.clone(), |c| c.name.clone()),
            image_url: contact.and_then(|c| c.avatar_url.clone()),
            assignee: None,
            status: ConversationStatus::New,
            is_open: true,
            snoozed_until: None,
            show_on_top: false,
            archived: false,
            priority: None,
            labels: Vec::new(),
            last_activity_at: now,
            last_message: None,
            contact_last_seen_at: None,
            agent_last_seen_at: None,
            waiting_since: None,
            rating: None,
            metrics: ConversationMetrics::default(),
            delivery: DeliveryMarks::default(),
            created_at: now,
        }
    }
}

/// A conversation snoozed until a time: the wake-up list. All tenants' entries are listed
/// together under [`Snooze::TENANT`], by the time they are due, so one walk from the oldest
/// finds every conversation to wake (also after a restart). An entry may outlive its snooze
/// (the conversation was woken, closed or snoozed again): whoever wakes it checks the
/// conversation first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snooze {
    pub tenant_id: String,
    pub room_id: String,
    /// When it is due; `None` once handled (the entry leaves the list).
    pub until: Option<Timestamp>,
}

impl RecordBody for Snooze {
    const KIND: RecordKind = RecordKind::Snooze;

    fn list_key(&self) -> Option<i64> {
        self.until.map(|t| t.0)
    }
}

impl Snooze {
    /// The tenant the wake-up list is kept under: a control character no token's tenant
    /// holds, so no tenant can read or write it.
    pub const TENANT: &'static str = "\u{1}wake-up";

    /// The record id of a room's entry (entries written before ids were length-prefixed still
    /// wake their rooms: the list is read for its bodies).
    pub fn id(room: &RoomKey) -> String {
        room_record_id(room)
    }
}

/// A conversation waiting in its tenant's support queue (`queued` or `escalated`), kept so the
/// queue outlives a restart. All tenants' entries are listed together under
/// [`QueueEntry::TENANT`]; an entry leaves the list (`queued_at: None`) once its conversation
/// leaves the queue. The conversation is the truth: whoever reads an entry checks it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueEntry {
    pub tenant_id: String,
    pub room_id: String,
    /// When it joined the queue; `None` once it left.
    pub queued_at: Option<Timestamp>,
}

impl RecordBody for QueueEntry {
    const KIND: RecordKind = RecordKind::QueueEntry;

    fn list_key(&self) -> Option<i64> {
        self.queued_at.map(|t| t.0)
    }
}

impl QueueEntry {
    /// The tenant the queue entries are kept under (no token's tenant holds a control
    /// character).
    pub const TENANT: &'static str = "\u{1}queue";

    /// The record id of a room's entry.
    pub fn id(room: &RoomKey) -> String {
        room_record_id(room)
    }
}

/// A record id naming a room of any tenant: `<tenant length>:<tenant>/<room>`, so that no two
/// rooms share one (a tenant `a/b`'s room `c` is not tenant `a`'s room `b/c`).
fn room_record_id(room: &RoomKey) -> String {
    format!(
        "{}:{}/{}",
        room.tenant_id.len(),
        room.tenant_id,
        room.room_id
    )
}

/// Which inbox a channel's public address opens: a website widget's key, an SMS or WhatsApp
/// number, an email address. They are one namespace for every tenant (a widget session starts
/// from the key alone, an inbound SMS from the number it was sent to), kept under
/// [`ChannelKey::TENANT`]; the inbox is the truth: a key whose inbox moved to another opens
/// nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelKey {
    pub tenant_id: String,
    pub inbox_id: String,
}

impl RecordBody for ChannelKey {
    const KIND: RecordKind = RecordKind::ChannelKey;
}

impl ChannelKey {
    /// The tenant the keys are kept under (no token's tenant holds a control character).
    pub const TENANT: &'static str = "\u{1}channel-key";

    /// The record id of a channel's key: `widget:<key>`, `sms:<number>`, `whatsapp:<number>`,
    /// `email:<address>` (lower-cased).
    pub fn id(channel: &Channel) -> String {
        match channel {
            Channel::WebWidget { widget_key, .. } => format!("widget:{widget_key}"),
            Channel::Sms { phone_number } => format!("sms:{phone_number}"),
            Channel::Whatsapp { phone_number } => format!("whatsapp:{phone_number}"),
            Channel::Email { address } => format!("email:{}", address.to_ascii_lowercase()),
        }
    }
}

/// The contact a phone number or email address belongs to in a tenant: record id
/// `phone:<number>` or `email:<address>` (lower-cased). The first contact saved with an
/// address keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContactAddress {
    pub contact_id: String,
}

impl RecordBody for ContactAddress {
    const KIND: RecordKind = RecordKind::ContactAddress;
}

impl ContactAddress {
    pub fn phone(number: &str) -> String {
        format!("phone:{number}")
    }

    pub fn email(address: &str) -> String {
        format!("email:{}", address.to_ascii_lowercase())
    }
}

/// What became of an outbound message (SMS, WhatsApp, email): record id
/// [`Delivery::id`] of the message's room and id, in the room's tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// `queued`, `sent`, `delivered`, `read`, `failed`, `undelivered`.
    pub status: String,
    #[serde(default)]
    pub provider_id: Option<String>,
    #[serde(default)]
    pub error_code: Option<String>,
    #[serde(default)]
    pub error_message: Option<String>,
    pub updated_at: Timestamp,
}

impl RecordBody for Delivery {
    const KIND: RecordKind = RecordKind::Delivery;
}

impl Delivery {
    /// The record id of message `message_id` of room `room_id` (length-prefixed: room ids may
    /// hold any character).
    pub fn id(room_id: &str, message_id: &str) -> String {
        format!("{}:{room_id}/{message_id}", room_id.len())
    }
}

/// The devices a user gets pushes on: record id the user's id, in the user's tenant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Devices {
    /// Oldest first; at most [`Devices::MAX`] (a new one pushes out the oldest).
    pub devices: Vec<Device>,
}

/// A device's push registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Device {
    /// The push service's registration token (FCM's).
    pub token: String,
    /// `android`, `ios` or `web`.
    pub platform: String,
    pub registered_at: Timestamp,
}

impl RecordBody for Devices {
    const KIND: RecordKind = RecordKind::Devices;
}

impl Devices {
    /// Most devices a user has registered at once.
    pub const MAX: usize = 10;

    /// Registers `device` (again: its token moves to the newest place).
    pub fn register(&mut self, device: Device) {
        self.devices.retain(|d| d.token != device.token);
        self.devices.push(device);
        let excess = self.devices.len().saturating_sub(Self::MAX);
        self.devices.drain(..excess);
    }

    /// Forgets `token`; whether it was there.
    pub fn forget(&mut self, token: &str) -> bool {
        let before = self.devices.len();
        self.devices.retain(|d| d.token != token);
        self.devices.len() != before
    }
}

/// An uploaded file: what is known of it (its bytes are in the file store, under the same
/// tenant and id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FileRecord {
    pub file_id: String,
    /// The name it was uploaded with.
    pub name: String,
    pub content_type: String,
    /// Bytes.
    pub size: u64,
    /// The conversation it was uploaded for: who may read that conversation may read it.
    #[serde(default)]
    pub room_id: Option<String>,
    pub uploaded_by: String,
    /// Hex SHA-256 of the bytes.
    pub sha256: String,
    pub created_at: Timestamp,
}

impl RecordBody for FileRecord {
    const KIND: RecordKind = RecordKind::File;
}

/// A tenant's own upload limits (its one record, id [`FileLimits::ID`]); what it leaves out
/// is the gateway's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FileLimits {
    /// Largest upload, in bytes (never above the gateway's own limit).
    #[serde(default)]
    pub max_file_bytes: Option<u64>,
    /// Content types an upload may have (`image/*` takes a family).
    #[serde(default)]
    pub file_types: Option<Vec<String>>,
}

impl RecordBody for FileLimits {
    const KIND: RecordKind = RecordKind::FileLimits;
}

impl FileLimits {
    /// The id of a tenant's record.
    pub const ID: &'static str = "files";
}

/// The pointer from a contact to its conversation of one kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContactConversation {
    pub room_id: String,
}

impl RecordBody for ContactConversation {
    const KIND: RecordKind = RecordKind::ContactConversation;
}

impl ContactConversation {
    /// The record id of `contact_id`'s conversation of `kind`.
    pub fn id(contact_id: &str, kind: RoomKind) -> String {
        format!("{contact_id}/{}", kind.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_record_ids_never_collide_across_tenants() {
        let a = QueueEntry::id(&RoomKey::new("acme", "eu/x"));
        let b = QueueEntry::id(&RoomKey::new("acme/eu", "x"));
        assert_ne!(a, b);
        assert_eq!(a, "4:acme/eu/x");
        assert_eq!(Snooze::id(&RoomKey::new("acme/eu", "x")), "7:acme/eu/x");
    }

    #[test]
    fn a_message_is_as_far_as_the_marks_of_the_side_it_is_for() {
        let mut marks = DeliveryMarks::default();
        assert!(marks.side(false).delivered(5));
        assert!(marks.side(true).read(3));
        // Never back.
        assert!(!marks.side(false).delivered(4));
        assert!(!marks.side(true).read(2));
        let state = |direction, seq| marks.state_of(direction, seq);
        assert_eq!(
            state(Direction::Outgoing, 5),
            Some(MessageDelivery::Delivered)
        );
        assert_eq!(state(Direction::Outgoing, 6), Some(MessageDelivery::Sent));
        assert_eq!(state(Direction::Incoming, 3), Some(MessageDelivery::Read));
        assert_eq!(state(Direction::Note, 4), Some(MessageDelivery::Sent));
        assert_eq!(state(Direction::Internal, 1), None);
        let mut later = DeliveryMarks::default();
        later.side(false).read(4);
        marks.merge(&later);
        assert_eq!(
            marks.contact,
            SeqMarks {
                delivered_seq: 5,
                read_seq: 4
            }
        );
        // Older records have no marks: everything is `sent`.
        let old: DeliveryMarks = serde_json::from_str("{}").unwrap();
        assert_eq!(old, DeliveryMarks::default());
        assert!(MessageDelivery::Read > MessageDelivery::Delivered);
        assert_eq!(
            MessageDelivery::of_provider("undelivered"),
            Some(MessageDelivery::Failed)
        );
    }
}
