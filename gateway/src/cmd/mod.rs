//! One module per protocol code (PROTOCOL.md §3), each the code's one home: parsing and
//! validation of its `data`, its access rule, and its effect on a room, as an `impl Shard`
//! block run on the room's shard. `crate::shard` keeps what every code shares: room ownership
//! and loading, sequencing of stored messages, and fan-out. [`Command::parse`] is the single
//! dispatch point for frames (it rejects unknown codes), [`RoomAction::apply`] the one for
//! room requests.

pub mod chat;
pub mod content;
pub mod conversation_get;
pub mod conversation_list;
pub mod conversation_update;
pub mod end;
pub mod escalate;
pub mod historic;
pub mod join;
pub mod leave;
pub mod note;
pub mod presence;
pub mod rate;
pub mod read_receipt;
pub mod subscribe_dashboard;
pub mod subscribe_inbox;
pub mod track_activity;
pub mod typing;

use std::time::Instant;

use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use storage::RoomKey;

use crate::codec::{ErrorCode, ProtocolError};
use crate::shard::{ConnRef, Shard};

/// The request codes a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    Join,
    Leave,
    Chat,
    Typing,
    ReadReceipt,
    Presence,
    Historic,
    Ping,
    Note,
    ConversationGet,
    ConversationUpdate,
    SubscribeInbox,
    End,
    Rate,
    ConversationList,
    Escalate,
    TrackActivity,
    PageView,
    SubscribeDashboard,
}

impl Code {
    /// Every code, for metric label pre-registration.
    pub const ALL: [Code; 19] = [
        Code::Join,
        Code::Leave,
        Code::Chat,
        Code::Typing,
        Code::ReadReceipt,
        Code::Presence,
        Code::Historic,
        Code::Ping,
        Code::Note,
        Code::ConversationGet,
        Code::ConversationUpdate,
        Code::SubscribeInbox,
        Code::End,
        Code::Rate,
        Code::ConversationList,
        Code::Escalate,
        Code::TrackActivity,
        Code::PageView,
        Code::SubscribeDashboard,
    ];

    pub fn parse(code: &str) -> Option<Code> {
        Some(match code {
            "join" => Code::Join,
            "leave" => Code::Leave,
            "chat" => Code::Chat,
            "typing" => Code::Typing,
            "read_receipt" => Code::ReadReceipt,
            "presence" => Code::Presence,
            "historic" => Code::Historic,
            "ping" => Code::Ping,
            "note" => Code::Note,
            "conversation_get" => Code::ConversationGet,
            "conversation_update" => Code::ConversationUpdate,
            "subscribe_inbox" => Code::SubscribeInbox,
            "end" => Code::End,
            "rate" => Code::Rate,
            "conversation_list" => Code::ConversationList,
            "escalate" => Code::Escalate,
            "track_activity" => Code::TrackActivity,
            "page_view" => Code::PageView,
            "subscribe_dashboard" => Code::SubscribeDashboard,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Code::Join => "join",
            Code::Leave => "leave",
            Code::Chat => "chat",
            Code::Typing => "typing",
            Code::ReadReceipt => "read_receipt",
            Code::Presence => "presence",
            Code::Historic => "historic",
            Code::Ping => "ping",
            Code::Note => "note",
            Code::ConversationGet => "conversation_get",
            Code::ConversationUpdate => "conversation_update",
            Code::SubscribeInbox => "subscribe_inbox",
            Code::End => "end",
            Code::Rate => "rate",
            Code::ConversationList => "conversation_list",
            Code::Escalate => "escalate",
            Code::TrackActivity => "track_activity",
            Code::PageView => "page_view",
            Code::SubscribeDashboard => "subscribe_dashboard",
        }
    }

    /// The code of every server frame about this kind.
    pub fn response(self) -> &'static str {
        match self {
            Code::Join => "join_response",
            Code::Leave => "leave_response",
            Code::Chat => "chat_response",
            Code::Typing => "typing_response",
            Code::ReadReceipt => "read_receipt_response",
            Code::Presence => "presence_response",
            Code::Historic => "historic_response",
            Code::Ping => "ping_response",
            Code::Note => "note_response",
            Code::ConversationGet => "conversation_get_response",
            Code::ConversationUpdate => "conversation_update_response",
            Code::SubscribeInbox => "subscribe_inbox_response",
            Code::End => "end_response",
            Code::Rate => "rate_response",
            Code::ConversationList => "conversation_list_response",
            Code::Escalate => "escalate_response",
            Code::TrackActivity => "track_activity_response",
            Code::PageView => "page_view_response",
            Code::SubscribeDashboard => "subscribe_dashboard_response",
        }
    }

    /// Whether the envelope must carry a `room_id`.
    pub fn needs_room(self) -> bool {
        !matches!(
            self,
            Code::Presence
                | Code::Ping
                | Code::SubscribeInbox
                | Code::ConversationList
                | Code::TrackActivity
                | Code::PageView
                | Code::SubscribeDashboard
        )
    }

    /// Position in [`Code::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A validated request.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Join(join::Join),
    Leave,
    Chat(chat::Chat),
    Typing(typing::Typing),
    ReadReceipt(read_receipt::ReadReceipt),
    Presence(presence::Presence),
    Historic(historic::Historic),
    Ping,
    Note(note::Note),
    ConversationGet(conversation_get::ConversationGet),
    ConversationUpdate(conversation_update::ConversationUpdate),
    SubscribeInbox(subscribe_inbox::SubscribeInbox),
    End(end::End),
    Rate(rate::Rate),
    ConversationList(conversation_list::ConversationList),
    Escalate(escalate::Escalate),
    Track(track_activity::Tracked),
    SubscribeDashboard(subscribe_dashboard::SubscribeDashboard),
}

impl Command {
    /// Parses `data` for `code`. `user_id` is the authenticated subject: a `sender` naming
    /// anyone else is `FORBIDDEN`.
    pub fn parse(code: Code, data: &RawValue, user_id: &str) -> Result<Command, ProtocolError> {
        Ok(match code {
            Code::Join => Command::Join(join::Join::parse(data)?),
            Code::Leave => {
                parse_data::<serde::de::IgnoredAny>(data)?;
                Command::Leave
            }
            Code::Chat => Command::Chat(chat::Chat::parse(data, user_id)?),
            Code::Typing => Command::Typing(typing::Typing::parse(data, user_id)?),
            Code::ReadReceipt => {
                Command::ReadReceipt(read_receipt::ReadReceipt::parse(data, user_id)?)
            }
            Code::Presence => Command::Presence(presence::Presence::parse(data, user_id)?),
            Code::Historic => Command::Historic(historic::Historic::parse(data)?),
            Code::Note => Command::Note(note::Note::parse(data, user_id)?),
            Code::ConversationGet => {
                Command::ConversationGet(conversation_get::ConversationGet::parse(data)?)
            }
            Code::ConversationUpdate => {
                Command::ConversationUpdate(conversation_update::ConversationUpdate::parse(data)?)
            }
            Code::SubscribeInbox => {
                Command::SubscribeInbox(subscribe_inbox::SubscribeInbox::parse(data)?)
            }
            Code::End => Command::End(end::End::parse(data)?),
            Code::Rate => Command::Rate(rate::Rate::parse(data)?),
            Code::Escalate => Command::Escalate(escalate::Escalate::parse(data)?),
            Code::TrackActivity => Command::Track(track_activity::Tracked::parse_activity(data)?),
            Code::PageView => Command::Track(track_activity::Tracked::parse_page_view(data)?),
            Code::SubscribeDashboard => {
                Command::SubscribeDashboard(subscribe_dashboard::SubscribeDashboard::parse(data)?)
            }
            Code::ConversationList => {
                Command::ConversationList(conversation_list::ConversationList::parse(data)?)
            }
            Code::Ping => {
                parse_data::<serde::de::IgnoredAny>(data)?;
                Command::Ping
            }
        })
    }
}

/// Deserializes `data` into a typed struct; any mismatch is `BAD_REQUEST` naming the field
/// (`data.mentions[1]: invalid type: …`).
pub(crate) fn parse_data<T: DeserializeOwned>(data: &RawValue) -> Result<T, ProtocolError> {
    let mut json = serde_json::Deserializer::from_str(data.get());
    serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let path = e.path().to_string();
        let error = e.into_inner();
        if path == "." {
            ProtocolError::bad_request(format!("invalid data: {error}"))
        } else {
            ProtocolError::bad_request(format!("invalid data.{path}: {error}"))
        }
    })
}

/// Adds `is_mine` (whether `viewer` sent it) to a serialized message, for a customer's eyes:
/// customers see which messages are theirs; the team's frames go without it.
pub(crate) fn mark_mine(message_json: &mut Vec<u8>, mine: bool) {
    let value: &[u8] = if mine { b"true" } else { b"false" };
    append_field(message_json, "is_mine", value);
}

/// Appends `"name":value` (`value` already JSON) to a serialized message.
pub(crate) fn append_field(message_json: &mut Vec<u8>, name: &str, value: &[u8]) {
    // A serialized message is a JSON object: its last byte is the closing brace.
    if message_json.last() == Some(&b'}') {
        message_json.pop();
        message_json.extend_from_slice(b",\"");
        message_json.extend_from_slice(name.as_bytes());
        message_json.extend_from_slice(b"\":");
        message_json.extend_from_slice(value);
        message_json.push(b'}');
    }
}

/// Whether a connection's message frames carry `is_mine`.
pub(crate) fn marks_mine(role: crate::auth::Role) -> bool {
    role == crate::auth::Role::Customer
}

/// The default of a boolean field that is on unless turned off (`subscribed`).
pub(crate) fn yes() -> bool {
    true
}

/// Codes only the team may send (following the inbox, the dashboard): `FORBIDDEN` for anyone
/// else, saying that only agents and admins `what`.
pub(crate) fn team_only(conn: &ConnRef, what: &str) -> Result<(), ProtocolError> {
    if conn.claims.role.sees_notes() {
        Ok(())
    } else {
        Err(ProtocolError::new(
            ErrorCode::Forbidden,
            format!("only agents and admins {what}"),
        ))
    }
}

/// `sender` must name the authenticated user.
pub(crate) fn check_sender(sender: &str, user_id: &str) -> Result<(), ProtocolError> {
    if sender == user_id {
        Ok(())
    } else {
        Err(ProtocolError::new(
            ErrorCode::Forbidden,
            "data.sender must equal the authenticated user",
        ))
    }
}

/// A room request as its code's handler gets it: who asked, about which room, and how to
/// answer (the code's own data comes separately).
pub(crate) struct RoomCall {
    pub conn: ConnRef,
    /// The room in the caller's tenant.
    pub room: RoomKey,
    pub reference: Option<String>,
    /// When the connection read the frame (fan-out latency starts here).
    pub received: Instant,
}

/// A request about one room, as the connection hands it to the room's shard. Each variant's
/// handler, access rule and effect live in the code's module; the shard only routes.
pub enum RoomAction {
    Join(join::Join),
    Leave,
    Chat(chat::Chat),
    Typing(typing::Typing),
    ReadReceipt(read_receipt::ReadReceipt),
    Historic(historic::Historic),
    Note(note::Note),
    ConversationGet(conversation_get::ConversationGet),
    ConversationUpdate(conversation_update::ConversationUpdate),
    End(end::End),
    Rate(rate::Rate),
    Escalate(escalate::Escalate),
    /// A message sent over the HTTP API, by a caller that has not joined the room.
    Post(Posted),
}

/// A `chat` or `note` posted without a membership: allowed to whoever may join the room
/// (`join`'s rule), then stored, answered and fanned out like one from a member.
pub enum Posted {
    Chat(chat::Chat),
    Note(note::Note),
}

impl RoomAction {
    pub fn code(&self) -> Code {
        match self {
            RoomAction::Join(_) => Code::Join,
            RoomAction::Leave => Code::Leave,
            RoomAction::Chat(_) => Code::Chat,
            RoomAction::Typing(_) => Code::Typing,
            RoomAction::ReadReceipt(_) => Code::ReadReceipt,
            RoomAction::Historic(_) => Code::Historic,
            RoomAction::Note(_) => Code::Note,
            RoomAction::ConversationGet(_) => Code::ConversationGet,
            RoomAction::ConversationUpdate(_) => Code::ConversationUpdate,
            RoomAction::End(_) => Code::End,
            RoomAction::Rate(_) => Code::Rate,
            RoomAction::Escalate(_) => Code::Escalate,
            RoomAction::Post(Posted::Chat(_)) => Code::Chat,
            RoomAction::Post(Posted::Note(_)) => Code::Note,
        }
    }

    /// The access rule every code shares: only a connection joined to the room may send it
    /// (`NOT_JOINED` otherwise). The codes that are not members-only check access
    /// themselves.
    pub fn members_only(&self) -> bool {
        matches!(
            self,
            RoomAction::Chat(_)
                | RoomAction::Note(_)
                | RoomAction::Typing(_)
                | RoomAction::ReadReceipt(_)
        )
    }

    /// Whether the request may load a room that is not in memory; any other request for such
    /// a room is answered without reading the store.
    pub fn loads_room(&self) -> bool {
        matches!(
            self,
            RoomAction::Join(_)
                | RoomAction::Historic(_)
                | RoomAction::ConversationGet(_)
                | RoomAction::ConversationUpdate(_)
                | RoomAction::End(_)
                | RoomAction::Rate(_)
                | RoomAction::Escalate(_)
                | RoomAction::Post(_)
        )
    }

    /// The uploaded files the message refers to: the references in its `attached_files` that
    /// are not `http(s)` URLs. Each must name a file of the room's tenant (and of this room,
    /// when it was uploaded for one) before the message goes to the room.
    pub fn file_ids(&self) -> Vec<String> {
        let attached = match self {
            RoomAction::Chat(chat) | RoomAction::Post(Posted::Chat(chat)) => &chat.attached_files,
            RoomAction::Note(note) | RoomAction::Post(Posted::Note(note)) => {
                &note.body.attached_files
            }
            _ => return Vec::new(),
        };
        attached
            .iter()
            .filter(|reference| content::is_file_id(reference))
            .cloned()
            .collect()
    }

    /// Runs the code's handler on a loaded room the caller passed the shared access rule for.
    pub(crate) fn apply(self, shard: &mut Shard, call: RoomCall) {
        match self {
            RoomAction::Join(join) => shard.join(call, join),
            RoomAction::Leave => shard.leave(call),
            RoomAction::Chat(chat) => shard.chat(call, chat),
            RoomAction::Typing(typing) => shard.typing(call, typing),
            RoomAction::ReadReceipt(receipt) => shard.read_receipt(call, receipt),
            RoomAction::Historic(historic) => shard.historic(call, historic),
            RoomAction::Note(note) => shard.note(call, note),
            RoomAction::ConversationGet(get) => shard.conversation_get(call, get),
            RoomAction::ConversationUpdate(update) => shard.conversation_update(call, update),
            RoomAction::End(end) => shard.end(call, end),
            RoomAction::Rate(rate) => shard.rate(call, rate),
            RoomAction::Escalate(escalate) => shard.escalate(call, escalate),
            RoomAction::Post(posted) => shard.post(call, posted),
        }
    }
}
