//! `note`: an internal note in a room, for the team only. Stored like a chat (same numbering,
//! idempotency and durability) with `direction: NOTE` and its `mentions`; its reply and event
//! are `note_response` frames, and the event reaches agent and admin connections only — never a
//! customer's or contact's, and a customer's `join` recovery and `historic` never include it
//! (the store filters notes out of every read made for a customer). Each mentioned user gets a
//! `notification_response` on every live team connection, with their unread count in the room.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use storage::{Direction, Message, NewMessage, RoomKey, Store, Timestamp};

use super::chat::Chat;
use super::{parse_data, Code, RoomCall};
use crate::codec::{ErrorCode, FrameBuilder, ProtocolError};
use crate::metrics::OutCode;
use crate::outbox::FrameClass;
use crate::presence::UserKey;
use crate::shard::{AppendContext, Route, Shard};

/// Most users one note may mention.
pub const MAX_MENTIONS: usize = 20;
/// Longest mentioned user id, in bytes.
pub const MAX_USER_ID_BYTES: usize = 64;
/// The code of the frames a user is notified with.
pub const NOTIFICATION_RESPONSE: &str = "notification_response";
/// Characters of the note's text a mention notification quotes.
const PREVIEW_CHARS: usize = 140;

#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    /// The text and attachments, validated by the same rules as a chat's.
    pub body: Chat,
    /// Users to notify, in the order given, without repeats.
    pub mentions: Vec<String>,
}

#[derive(Deserialize)]
struct MentionsData {
    #[serde(default)]
    mentions: Vec<String>,
}

impl Note {
    pub fn parse(data: &RawValue, user_id: &str) -> Result<Note, ProtocolError> {
        let body = Chat::parse(data, user_id)?;
        let MentionsData { mentions } = parse_data(data)?;
        if mentions.len() > MAX_MENTIONS {
            return Err(ProtocolError::bad_request(format!(
                "mentions: at most {MAX_MENTIONS} users"
            )));
        }
        let mut unique: Vec<String> = Vec::with_capacity(mentions.len());
        for user in mentions {
            if user.is_empty() || user.len() > MAX_USER_ID_BYTES {
                return Err(ProtocolError::bad_request(
                    "mentions: each user id must be 1 to 64 bytes",
                ));
            }
            if !unique.contains(&user) {
                unique.push(user);
            }
        }
        Ok(Note {
            body,
            mentions: unique,
        })
    }
}

impl Shard {
    /// `note`: agents and admins only (`FORBIDDEN` for anyone else); stored through the room's
    /// sequencing like a chat, answered by [`Shard::answer_stored`].
    pub(crate) fn note(&mut self, call: RoomCall, note: Note) {
        if !call.conn.claims.role.sees_notes() {
            let error =
                ProtocolError::new(ErrorCode::Forbidden, "only agents and admins write notes");
            return self.reply_error(
                &call.conn,
                Code::Note,
                &call.room,
                call.reference.as_deref(),
                error,
            );
        }
        let RoomCall {
            conn,
            room: room_id,
            reference,
            received,
        } = call;
        let Note { body, mentions } = note;
        let message = NewMessage {
            message_id: body
                .message_id
                .unwrap_or_else(|| ulid::Ulid::new().to_string()),
            seq: 0,
            tenant_id: room_id.tenant_id.clone(),
            room_id: room_id.room_id.clone(),
            sender: conn.claims.sub.clone(),
            sender_type: conn.claims.role.sender_type(),
            direction: Direction::Note,
            kind: body.kind,
            message: body.message,
            attached_files: body.attached_files,
            reply_to: body.reply_to,
            mentions,
            metadata: body.metadata,
            created_at: Timestamp::now(),
        };
        self.start_append(AppendContext {
            code: Code::Note,
            room_id,
            conn,
            reference,
            received,
            message,
            attempts: 0,
            unnumbered: false,
            id_checked: false,
        });
    }

    /// A new note is stored: each mentioned user (but the author) hears of it on every live
    /// team connection, with their unread count in the room read after the note was stored
    /// (in a helper task; without one to spare, the notification goes out without the count).
    pub(crate) fn notify_mentions(&mut self, room_id: &RoomKey, note: &Message) {
        let recipients: Vec<(String, Vec<crate::shard::ConnRef>)> = note
            .mentions
            .iter()
            .map(String::as_str)
            .filter(|user| *user != note.sender)
            .filter_map(|user| {
                let key = UserKey {
                    tenant: room_id.tenant_id.clone(),
                    user_id: user.to_owned(),
                };
                let conns: Vec<_> = self
                    .shared
                    .presence
                    .connections(&key)
                    .into_iter()
                    .filter(|conn| conn.claims.role.sees_notes())
                    .collect();
                (!conns.is_empty()).then(|| (user.to_owned(), conns))
            })
            .collect();
        if recipients.is_empty() {
            return;
        }
        let mention = Mention {
            room_id: room_id.room_id.clone(),
            message_id: note.message_id.clone(),
            seq: note.seq,
            sender: note.sender.clone(),
            unread_count: None,
        };
        let preview: String = note.message.chars().take(PREVIEW_CHARS).collect();
        let (shared, here) = (self.shared.clone(), self.index);
        let send = move |user: &str, conns: &[crate::shard::ConnRef], mention: &Mention| {
            let frame = notification_frame(user, &mention.room_id, &preview, mention);
            let route = Route::new(&shared.shards, here);
            for conn in conns {
                route.send(conn, frame.clone(), FrameClass::Durable);
            }
            shared
                .metrics
                .frames_out(OutCode::Notification, conns.len() as u64);
        };
        let Some(permit) = self.try_work() else {
            for (user, conns) in &recipients {
                send(user, conns, &mention);
            }
            return;
        };
        let store = self.shared.store.clone();
        let room_id = room_id.clone();
        tokio::spawn(async move {
            for (user, conns) in &recipients {
                let unread_count = store
                    .read_state(&room_id, user)
                    .await
                    .ok()
                    .map(|state| state.unread_for(true));
                send(
                    user,
                    conns,
                    &Mention {
                        unread_count,
                        ..mention.clone()
                    },
                );
            }
            drop(permit);
        });
    }
}

/// What a mention notification points at.
#[derive(Serialize, Clone)]
struct Mention {
    room_id: String,
    message_id: String,
    seq: u64,
    sender: String,
    /// The mentioned user's unread messages in the room (notes included).
    #[serde(skip_serializing_if = "Option::is_none")]
    unread_count: Option<u64>,
}

/// The `data` of a `notification_response` (the fields teams know from their notification
/// rooms: `type`, `title`, `message`, `data`).
#[derive(Serialize)]
struct NotificationData<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    title: String,
    message: &'a str,
    data: &'a Mention,
}

fn notification_frame(user: &str, room_id: &str, preview: &str, mention: &Mention) -> bytes::Bytes {
    FrameBuilder::success(
        NOTIFICATION_RESPONSE,
        user,
        Some(room_id),
        None,
        NotificationData {
            kind: "mention",
            title: format!("{} mentioned you", mention.sender),
            message: preview,
            data: mention,
        },
    )
}
