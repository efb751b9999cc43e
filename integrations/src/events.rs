//! The event contract: one versioned JSON payload per topic (`docs/integrations.md` shows each
//! with an example). Every payload carries `"v": 1`; readers tolerate fields they do not know,
//! so a producer may add fields without a new version. A payload that does not parse is not
//! dropped: [`decode`] says why, and the consumer sends it to the dead-letter topic with that
//! reason and goes on.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The version every payload of this contract carries in `v`.
pub const VERSION: u32 = 1;

/// The topics, by the role each plays. Their names are configurable (a deployment may prefix
/// them); [`Topics::default`] gives the documented ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Gateway → everyone: stored messages (never notes) and conversation changes.
    pub conversation_events: String,
    /// Gateway → sms-worker: an agent's message to an SMS or WhatsApp contact.
    pub outbound_sms: String,
    /// Gateway → email-worker.
    pub outbound_email: String,
    /// Gateway → push-worker: a user without a live connection to notify.
    pub notifications_push: String,
    /// Workers → gateway: a contact wrote.
    pub inbound_messages: String,
    /// Workers → gateway: what became of an outbound message.
    pub delivery_status: String,
    /// push-worker → gateway: a device token the push service no longer knows.
    pub device_tokens: String,
    /// Where a payload that does not parse goes, with the reason.
    pub dead_letters: String,
    /// What every name above starts with (and every consumer group's name: a deployment's
    /// groups are its own).
    pub prefix: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            conversation_events: "conversation.events".into(),
            outbound_sms: "outbound.sms".into(),
            outbound_email: "outbound.email".into(),
            notifications_push: "notifications.push".into(),
            inbound_messages: "inbound.messages".into(),
            delivery_status: "delivery.status".into(),
            device_tokens: "device.tokens".into(),
            dead_letters: "dead.letters".into(),
            prefix: String::new(),
        }
    }
}

impl Topics {
    /// The name of consumer group `group` in this deployment.
    pub fn group(&self, group: &str) -> String {
        format!("{}{group}", self.prefix)
    }

    /// The documented topics, each name behind `prefix` (`""` leaves them as they are): one
    /// Kafka cluster can carry several deployments (or test runs) apart.
    pub fn with_prefix(prefix: &str) -> Topics {
        let named = |name: String| format!("{prefix}{name}");
        let topics = Topics::default();
        Topics {
            conversation_events: named(topics.conversation_events),
            outbound_sms: named(topics.outbound_sms),
            outbound_email: named(topics.outbound_email),
            notifications_push: named(topics.notifications_push),
            inbound_messages: named(topics.inbound_messages),
            delivery_status: named(topics.delivery_status),
            device_tokens: named(topics.device_tokens),
            dead_letters: named(topics.dead_letters),
            prefix: prefix.to_owned(),
        }
    }
}

/// `conversation.events`: what happened in a conversation, keyed by `room_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ConversationEvent {
    /// A message was stored (a chat; notes never leave the gateway).
    #[serde(rename = "message.created")]
    MessageCreated {
        v: u32,
        tenant_id: String,
        room_id: String,
        /// The message as PROTOCOL.md §4 shows it.
        message: serde_json::Value,
    },
    /// A conversation was opened, changed, assigned, closed, …
    #[serde(rename = "conversation.changed")]
    ConversationChanged {
        v: u32,
        tenant_id: String,
        room_id: String,
        /// What changed (`created`, `updated`, `agent_joined`, `ended`, …).
        change: String,
        /// The conversation as the team sees it.
        conversation: serde_json::Value,
    },
}

/// Which messaging network an SMS-like message travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmsChannel {
    Sms,
    Whatsapp,
}

/// `outbound.sms`: an agent's message for a contact's phone (SMS or WhatsApp).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboundSms {
    pub v: u32,
    pub tenant_id: String,
    pub room_id: String,
    /// The stored message's id: the idempotency key of the send.
    pub message_id: String,
    pub channel: SmsChannel,
    /// The inbox's number (E.164).
    pub from: String,
    /// The contact's number (E.164).
    pub to: String,
    pub body: String,
    #[serde(default)]
    pub media_urls: Vec<String>,
}

/// `outbound.email`: an agent's message for a contact's address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboundEmail {
    pub v: u32,
    pub tenant_id: String,
    pub room_id: String,
    /// The stored message's id: the idempotency key, and the base of the mail's `Message-ID`.
    pub message_id: String,
    /// The inbox's address.
    pub from: String,
    /// The inbox's name, shown as the sender's (`Acme Help <help@acme.example>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_name: Option<String>,
    pub to: String,
    pub subject: String,
    pub text: String,
    /// The `Message-ID` of the contact's latest mail in the conversation, to thread the reply.
    #[serde(default)]
    pub in_reply_to: Option<String>,
    /// The thread's earlier `Message-ID`s, oldest first.
    #[serde(default)]
    pub references: Vec<String>,
}

/// Why a push goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PushReason {
    /// Mentioned in a note (the push names the conversation, never the note's text).
    Mention,
    /// A new message in a conversation the user takes part in.
    Message,
}

/// `notifications.push`: a user with no live connection to notify.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushNotification {
    pub v: u32,
    pub tenant_id: String,
    pub user_id: String,
    pub room_id: String,
    pub message_id: String,
    pub reason: PushReason,
    pub title: String,
    pub body: String,
    /// The user's registered device tokens (FCM registration tokens) when it was produced.
    #[serde(default)]
    pub device_tokens: Vec<String>,
}

/// `device.tokens`: the push service said a device token is no longer valid (the app was
/// uninstalled, the token rotated): the gateway forgets it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceTokenGone {
    pub v: u32,
    pub tenant_id: String,
    pub user_id: String,
    pub token: String,
    /// The push service's error (`UNREGISTERED`).
    pub reason: String,
}

/// The network an inbound message came over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InboundChannel {
    Sms,
    Whatsapp,
    Email,
}

/// A file that came with an inbound message (metadata only: the provider keeps the bytes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InboundAttachment {
    pub url: Option<String>,
    pub content_type: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub size: Option<u64>,
}

/// `inbound.messages`: a contact wrote. The gateway finds the inbox by `channel` and `to`, the
/// contact by `from` (creating it), stores the message as `INCOMING` in the contact's prospect
/// conversation (opened or reopened) and fans it out; `provider_id` makes a redelivery a no-op.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InboundMessage {
    pub v: u32,
    pub channel: InboundChannel,
    /// The contact's number or address.
    pub from: String,
    /// The inbox's number or address.
    pub to: String,
    /// The provider's id of the message (Twilio's `MessageSid`, the mail's `Message-ID`).
    pub provider_id: String,
    pub text: String,
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub attachments: Vec<InboundAttachment>,
    /// The contact's name, when the provider knows it.
    #[serde(default)]
    pub from_name: Option<String>,
    /// Mail only: the `Message-ID`s the mail answers (`In-Reply-To`, then `References`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_reply_to: Vec<String>,
}

/// Where an outbound message is. It only moves forward: `queued` → `sent` → `delivered` →
/// `read`, or to `failed` / `undelivered` (with the provider's error) before it was delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    Queued,
    Sent,
    Delivered,
    Read,
    Failed,
    Undelivered,
}

impl DeliveryState {
    fn rank(self) -> u8 {
        match self {
            DeliveryState::Queued => 0,
            DeliveryState::Sent => 1,
            DeliveryState::Failed | DeliveryState::Undelivered => 2,
            DeliveryState::Delivered => 3,
            DeliveryState::Read => 4,
        }
    }

    /// Whether a message in state `self` may move to `next`: forward only, and a failure only
    /// before delivery (a late `failed` after `delivered` is news of nothing).
    pub fn may_become(self, next: DeliveryState) -> bool {
        let failure =
            |s: DeliveryState| matches!(s, DeliveryState::Failed | DeliveryState::Undelivered);
        if failure(self) {
            // A failed message stays failed, unless the provider later says it did arrive.
            return matches!(next, DeliveryState::Delivered | DeliveryState::Read);
        }
        next.rank() > self.rank()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Queued => "queued",
            DeliveryState::Sent => "sent",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Read => "read",
            DeliveryState::Failed => "failed",
            DeliveryState::Undelivered => "undelivered",
        }
    }
}

/// `delivery.status`: what became of an outbound message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryStatus {
    pub v: u32,
    pub tenant_id: String,
    pub room_id: String,
    pub message_id: String,
    pub status: DeliveryState,
    /// The provider's id of the send (Twilio's `MessageSid`).
    #[serde(default)]
    pub provider_id: Option<String>,
    /// The provider's error code (Twilio's `ErrorCode`, an SMTP reply code).
    #[serde(default)]
    pub error_code: Option<String>,
    #[serde(default)]
    pub error_message: Option<String>,
}

/// `dead.letters`: a payload a consumer could not read, with why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub v: u32,
    /// The topic it was read from, and its key there.
    pub topic: String,
    pub key: String,
    pub reason: String,
    /// The payload, as UTF-8 text where it is (lossy otherwise).
    pub payload: String,
}

/// Why a payload was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("not JSON of this topic's payload: {0}")]
    Malformed(String),
    #[error("unsupported version {0} (this reader knows {VERSION})")]
    Version(u32),
}

#[derive(Deserialize)]
struct Versioned {
    v: u32,
}

/// Reads a payload of the contract: its version, then its fields (unknown ones are ignored).
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, Rejected> {
    let versioned: Versioned =
        serde_json::from_slice(payload).map_err(|e| Rejected::Malformed(e.to_string()))?;
    if versioned.v != VERSION {
        return Err(Rejected::Version(versioned.v));
    }
    serde_json::from_slice(payload).map_err(|e| Rejected::Malformed(e.to_string()))
}

/// Serializes a payload (the contract's types always serialize).
pub fn encode<T: Serialize>(payload: &T) -> bytes::Bytes {
    bytes::Bytes::from(serde_json::to_vec(payload).unwrap_or_default())
}

impl DeadLetter {
    /// The dead letter of a payload read from `topic` under `key`.
    pub fn of(topic: &str, key: &str, payload: &[u8], reason: &Rejected) -> DeadLetter {
        DeadLetter {
            v: VERSION,
            topic: topic.to_owned(),
            key: key.to_owned(),
            reason: reason.to_string(),
            payload: String::from_utf8_lossy(payload).into_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_tolerated_and_wrong_shapes_say_why() {
        let status: DeliveryStatus = decode(
            br#"{"v":1,"tenant_id":"t","room_id":"r","message_id":"m","status":"delivered","carrier":"x"}"#,
        )
        .unwrap();
        assert_eq!(status.status, DeliveryState::Delivered);
        let missing = decode::<DeliveryStatus>(br#"{"v":1,"tenant_id":"t"}"#).unwrap_err();
        assert!(missing.to_string().contains("missing field"), "{missing}");
        assert_eq!(
            decode::<DeliveryStatus>(br#"{"v":2}"#).unwrap_err(),
            Rejected::Version(2)
        );
        assert!(matches!(
            decode::<DeliveryStatus>(b"\xff not json"),
            Err(Rejected::Malformed(_))
        ));
    }

    #[test]
    fn delivery_only_moves_forward() {
        use DeliveryState::*;
        assert!(Queued.may_become(Sent));
        assert!(Sent.may_become(Delivered));
        assert!(Delivered.may_become(Read));
        assert!(!Delivered.may_become(Sent));
        assert!(!Read.may_become(Delivered));
        assert!(Sent.may_become(Failed));
        assert!(!Delivered.may_become(Failed));
        assert!(!Failed.may_become(Sent));
        assert!(Failed.may_become(Delivered));
        assert!(!Sent.may_become(Sent));
    }

    #[test]
    fn conversation_events_are_tagged_by_type() {
        let event = ConversationEvent::MessageCreated {
            v: VERSION,
            tenant_id: "t".into(),
            room_id: "r".into(),
            message: serde_json::json!({"message_id": "m"}),
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["type"], "message.created");
        assert_eq!(decode::<ConversationEvent>(&encode(&event)).unwrap(), event);
    }
}
