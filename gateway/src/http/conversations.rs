//! Conversations and their messages over HTTP, answered by the socket codes' own handlers
//! ([`super::call`]): the same access rules, storage, idempotency by `message_id` and fan-out
//! to the room's sockets.
//!
//! - `GET /api/v1/conversations` (`conversation_list`), `GET /api/v1/conversations/{id}`
//!   (`conversation_get`), `PATCH /api/v1/conversations/{id}` (`conversation_update`).
//! - `GET /api/v1/conversations/{id}/messages` (`historic`): pages with `before`/`after`,
//!   `limit`, `search`; a customer's pages never hold a note.
//! - `POST /api/v1/conversations/{id}/messages` (`chat`, or `note` with `"type": "note"`).
//! - `POST /api/v1/broadcast`: one message into many rooms, each as if sent there.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::future::join_all;
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use storage::Message;
use utoipa::{IntoParams, ToSchema};

use super::{call, caller, json_body, reply, reply_raw, require, ApiError, ApiResult, ErrorBody};
use crate::auth::{Claims, Role};
use crate::cmd::conversation_get::ConversationGet;
use crate::cmd::conversation_update::ConversationUpdate;
use crate::cmd::historic::{Historic, MAX_LIMIT, MAX_SEARCH_BYTES};
use crate::cmd::{Code, Command, Posted, RoomAction};
use crate::codec::ProtocolError;
use crate::server::Shared;

/// Messages a page holds unless `limit` says otherwise.
const DEFAULT_PAGE: u32 = 20;
/// Most rooms one broadcast reaches.
pub(crate) const MAX_BROADCAST_ROOMS: usize = 100;

/// The query string as named values; a parameter given twice is `400`.
struct Query(HashMap<String, String>);

impl Query {
    fn of(req: &Request<Incoming>, known: &[&str]) -> Result<Query, ApiError> {
        let mut values = HashMap::new();
        for (key, value) in super::form_pairs(req.uri().query().unwrap_or("")) {
            if !known.contains(&key.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {key:?}"
                )));
            }
            if values.insert(key.clone(), value).is_some() {
                return Err(ApiError::bad_request(format!(
                    "query parameter {key:?} given twice"
                )));
            }
        }
        Ok(Query(values))
    }

    fn text(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    fn number(
        &self,
        name: &str,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<Option<u64>, ApiError> {
        let Some(text) = self.text(name) else {
            return Ok(None);
        };
        match text.parse::<u64>() {
            Ok(n) if range.contains(&n) => Ok(Some(n)),
            _ => Err(ApiError::bad_request(format!(
                "{name} must be an integer from {} to {}",
                range.start(),
                range.end()
            ))),
        }
    }
}

/// Runs a room code for the caller and answers its reply's `data` with `status`.
async fn room_call(
    shared: &Arc<Shared>,
    claims: Arc<Claims>,
    room_id: &str,
    action: RoomAction,
    status: StatusCode,
) -> ApiResult {
    let data = call::room(shared, claims, room_id, action).await?;
    reply_raw(status, &data)
}

/// Posts a message into a room as the caller, once the files it attaches are found.
async fn post(
    shared: &Arc<Shared>,
    claims: Arc<Claims>,
    room_id: &str,
    posted: Posted,
) -> Result<call::Data, ProtocolError> {
    let action = RoomAction::Post(posted);
    let file_ids = action.file_ids();
    if !file_ids.is_empty() {
        let room = storage::RoomKey::new(&claims.tenant, room_id);
        super::files::check_attachments(shared, &room, &file_ids).await?;
    }
    call::room(shared, claims, room_id, action).await
}

/// A code's `data` built from JSON, parsed by the code itself.
fn parse_command(
    code: Code,
    data: &serde_json::Value,
    claims: &Claims,
) -> Result<Command, ApiError> {
    let raw = serde_json::value::to_raw_value(data)
        .map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))?;
    Command::parse(code, &raw, &claims.sub).map_err(|e| {
        // The code names its fields `data.x`; over HTTP they are the body's.
        ApiError::from(ProtocolError {
            message: e
                .message
                .replace("data.", "body.")
                .replace("invalid data", "invalid body"),
            ..e
        })
    })
}

/// The `conversation_list` filters and cursor.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct ListParams {
    /// `OPEN` (default), `CLOSED`, `SNOOZED`, `UNREAD`, `PRIORITY`, `ASSIGNED_TO_ME`, `ALL`.
    filter: Option<String>,
    /// `NEWEST` (default) or `OLDEST`.
    sort: Option<String>,
    inbox_id: Option<String>,
    label: Option<String>,
    /// 1–100, default 25.
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
    /// The previous page's `next`.
    next: Option<String>,
}

/// A page of the team's inbox: the tenant's conversations by last activity (agents and
/// admins), as `conversation_list` answers it.
#[utoipa::path(get, path = "/api/v1/conversations", tag = "conversations", params(ListParams),
    responses(
        (status = 200, description = "`{conversations, next, has_more}`", body = Object),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody),
    ))]
pub(crate) async fn list(shared: Arc<Shared>, req: Request<Incoming>) -> ApiResult {
    let claims = caller(&shared, &req)?;
    let query = Query::of(
        &req,
        &["filter", "sort", "inbox_id", "label", "limit", "next"],
    )?;
    let mut data = serde_json::Map::new();
    for name in ["filter", "sort", "inbox_id", "label", "next"] {
        if let Some(value) = query.text(name) {
            data.insert(name.to_owned(), value.into());
        }
    }
    if let Some(limit) = query.number("limit", 1..=100)? {
        data.insert("limit".to_owned(), limit.into());
    }
    let Command::ConversationList(list) =
        parse_command(Code::ConversationList, &data.into(), &claims)?
    else {
        return Err(ApiError::bad_request("not a conversation list"));
    };
    let page = call::conversation_list(&shared, claims, list).await?;
    reply_raw(StatusCode::OK, &page)
}

/// A conversation: the team's view (with its unread count and queue position), or the
/// customer's own conversation in the customer's view.
#[utoipa::path(get, path = "/api/v1/conversations/{room_id}", tag = "conversations",
    params(("room_id" = String, Path)),
    responses(
        (status = 200, body = Object),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody),
    ))]
pub(crate) async fn get(shared: Arc<Shared>, req: Request<Incoming>, room_id: &str) -> ApiResult {
    let claims = caller(&shared, &req)?;
    let action = RoomAction::ConversationGet(ConversationGet);
    room_call(&shared, claims, room_id, action, StatusCode::OK).await
}

/// Manages a conversation (agents and admins), as `conversation_update`: open or close,
/// snooze, pin, archive, retitle, priority, labels, participants, assignee.
#[utoipa::path(patch, path = "/api/v1/conversations/{room_id}", tag = "conversations",
    params(("room_id" = String, Path)), request_body = crate::inbox::ConversationPatch,
    responses(
        (status = 200, body = Object),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub(crate) async fn update(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    room_id: &str,
) -> ApiResult {
    let claims = caller(&shared, &req)?;
    let body: serde_json::Value = json_body(req).await?;
    let Command::ConversationUpdate(update) =
        parse_command(Code::ConversationUpdate, &body, &claims)?
    else {
        return Err(ApiError::bad_request("not a conversation update"));
    };
    let action = RoomAction::ConversationUpdate(ConversationUpdate { ..update });
    room_call(&shared, claims, room_id, action, StatusCode::OK).await
}

/// `GET …/messages` parameters.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct MessagesParams {
    /// Messages before this `seq` (older); the newest when neither cursor is given.
    #[param(minimum = 0)]
    before: Option<u64>,
    /// Messages after this `seq` (newer).
    #[param(minimum = 0)]
    after: Option<u64>,
    /// 1–200, default 20.
    #[param(minimum = 1, maximum = 200)]
    limit: Option<u32>,
    /// Words to find (at most 256 bytes).
    #[param(max_length = 256)]
    search: Option<String>,
}

/// A page of messages, oldest first.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct MessagePage {
    /// A customer's messages carry `is_mine`.
    messages: Vec<Message>,
    has_more: bool,
    /// Where the next older page starts when this one stopped early.
    next_before_seq: Option<u64>,
    /// Where the next newer page starts when this one stopped early.
    next_after_seq: Option<u64>,
}

/// A page of a conversation's messages (or of a search in them). A customer's pages never
/// hold a note.
#[utoipa::path(get, path = "/api/v1/conversations/{room_id}/messages", tag = "messages",
    params(("room_id" = String, Path), MessagesParams),
    responses(
        (status = 200, body = MessagePage),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub(crate) async fn messages(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    room_id: &str,
) -> ApiResult {
    let claims = caller(&shared, &req)?;
    let query = Query::of(&req, &["before", "after", "limit", "search"])?;
    let search = query.text("search").map(str::to_owned);
    if search.as_ref().is_some_and(|s| s.len() > MAX_SEARCH_BYTES) {
        return Err(ApiError::bad_request("search is longer than 256 bytes"));
    }
    let historic = Historic {
        before_seq: query.number("before", 0..=u64::MAX)?,
        after_seq: query.number("after", 0..=u64::MAX)?,
        limit: query
            .number("limit", 1..=u64::from(MAX_LIMIT))?
            .map_or(DEFAULT_PAGE, |n| n as u32),
        search: search.filter(|s| !s.trim().is_empty()),
    };
    let action = RoomAction::Historic(historic);
    room_call(&shared, claims, room_id, action, StatusCode::OK).await
}

/// A message to send: the `chat` code's fields, or a note (`"type": "note"`, team only).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SendMessage {
    /// The text (at most 16384 bytes); may be empty only with `attached_files`.
    #[serde(default)]
    #[schema(max_length = 16384)]
    message: String,
    /// `text` (default), `markdown`, `image`, `audio`, `video`, `file`, `location`,
    /// `carousel`, `card`, `dropdown`, `choice`, or `note`.
    #[serde(rename = "type")]
    kind: Option<String>,
    /// 1–64 bytes: the idempotency key (a retry with it answers the stored message).
    #[schema(min_length = 1, max_length = 64)]
    message_id: Option<String>,
    /// Ids from `POST /api/v1/files`.
    #[serde(default)]
    attached_files: Vec<String>,
    reply_to: Option<String>,
    #[schema(value_type = Option<Object>)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// A note's mentioned users (at most 20).
    #[serde(default)]
    mentions: Vec<String>,
}

impl SendMessage {
    /// The `chat` (or `note`) this is, from `claims`' user.
    fn posted(self, claims: &Claims) -> Result<Posted, ApiError> {
        let note = self.kind.as_deref() == Some("note");
        if !note && !self.mentions.is_empty() {
            return Err(ApiError::bad_request("mentions are for notes only"));
        }
        let mut data = serde_json::json!({
            "message": self.message,
            "sender": claims.sub,
            "attached_files": self.attached_files,
        });
        let fields = [
            ("type", self.kind.filter(|_| !note).map(Into::into)),
            ("message_id", self.message_id.map(Into::into)),
            ("reply_to", self.reply_to.map(Into::into)),
            ("metadata", self.metadata.map(serde_json::Value::Object)),
        ];
        for (name, value) in fields {
            if let Some(value) = value {
                data[name] = value;
            }
        }
        if note {
            data["mentions"] = self.mentions.into();
            match parse_command(Code::Note, &data, claims)? {
                Command::Note(note) => Ok(Posted::Note(note)),
                _ => Err(ApiError::bad_request("not a note")),
            }
        } else {
            match parse_command(Code::Chat, &data, claims)? {
                Command::Chat(chat) => Ok(Posted::Chat(chat)),
                _ => Err(ApiError::bad_request("not a message")),
            }
        }
    }
}

/// Sends a message into a conversation as the caller (an agent's or a customer's, or a note
/// with `"type": "note"`): stored, answered and fanned out to the room's sockets exactly as a
/// socket's `chat`. A retry with the same `message_id` answers the stored message and is not
/// delivered twice.
#[utoipa::path(post, path = "/api/v1/conversations/{room_id}/messages", tag = "messages",
    params(("room_id" = String, Path)), request_body = SendMessage,
    responses(
        (status = 201, description = "Stored (a retry answers the stored message)", body = Message),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody),
    ))]
pub(crate) async fn send(shared: Arc<Shared>, req: Request<Incoming>, room_id: &str) -> ApiResult {
    let claims = caller(&shared, &req)?;
    let body: SendMessage = json_body(req).await?;
    let posted = body.posted(&claims)?;
    room_call(
        &shared,
        claims,
        room_id,
        RoomAction::Post(posted),
        StatusCode::CREATED,
    )
    .await
}

/// One message for many rooms.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BroadcastBody {
    /// 1–100 rooms of the caller's tenant.
    #[schema(min_items = 1, max_items = 100)]
    room_ids: Vec<String>,
    #[serde(default)]
    message: String,
    #[serde(rename = "type")]
    kind: Option<String>,
    /// The idempotency key, the same in every room (a retried broadcast stores nothing twice).
    #[schema(min_length = 1, max_length = 64)]
    message_id: Option<String>,
    #[serde(default)]
    attached_files: Vec<String>,
    #[schema(value_type = Option<Object>)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// What became of a broadcast in one room.
#[derive(Serialize, ToSchema)]
pub(crate) struct BroadcastResult {
    room_id: String,
    /// The status sending it there alone would have answered.
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Message>)]
    message: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<super::ErrorDetail>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct BroadcastReply {
    sent: usize,
    failed: usize,
    /// In the order of `room_ids`.
    results: Vec<BroadcastResult>,
}

/// Sends one message to many rooms (services and admins): each stored and fanned out as if
/// sent in that room. Answers every room's outcome; one room failing does not stop the others.
#[utoipa::path(post, path = "/api/v1/broadcast", tag = "messages", request_body = BroadcastBody,
    responses(
        (status = 200, body = BroadcastReply),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody),
    ))]
pub(crate) async fn broadcast(shared: Arc<Shared>, req: Request<Incoming>) -> ApiResult {
    let claims = caller(&shared, &req)?;
    require(&claims, &[Role::Admin, Role::Service], "broadcast")?;
    let body: BroadcastBody = json_body(req).await?;
    if body.room_ids.is_empty() || body.room_ids.len() > MAX_BROADCAST_ROOMS {
        return Err(ApiError::bad_request("room_ids: 1 to 100 rooms"));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(twice) = body.room_ids.iter().find(|id| !seen.insert(id.as_str())) {
        return Err(ApiError::bad_request(format!(
            "room_ids: {twice:?} is given twice"
        )));
    }
    // A message id shared by every room makes a retried broadcast idempotent everywhere.
    let message_id = body
        .message_id
        .unwrap_or_else(|| ulid::Ulid::new().to_string());
    let message = SendMessage {
        message: body.message,
        kind: body.kind,
        message_id: Some(message_id),
        attached_files: body.attached_files,
        reply_to: None,
        metadata: body.metadata,
        mentions: Vec::new(),
    };
    let Posted::Chat(chat) = message.posted(&claims)? else {
        return Err(ApiError::bad_request("a broadcast is not a note"));
    };
    let sends = body.room_ids.iter().map(|room_id| {
        let posted = Posted::Chat(chat.clone());
        let (shared, claims) = (&shared, claims.clone());
        async move { post(shared, claims, room_id, posted).await }
    });
    let outcomes = join_all(sends).await;
    let results: Vec<BroadcastResult> = body
        .room_ids
        .into_iter()
        .zip(outcomes)
        .map(|(room_id, outcome)| match outcome {
            Ok(message) => BroadcastResult {
                room_id,
                status: StatusCode::CREATED.as_u16(),
                message: Some(message),
                error: None,
            },
            Err(e) => {
                let e = ApiError::from(e);
                BroadcastResult {
                    room_id,
                    status: e.status.as_u16(),
                    message: None,
                    error: Some(super::ErrorDetail {
                        code: e.code.to_owned(),
                        message: e.message,
                        message_id: e.message_id,
                    }),
                }
            }
        })
        .collect();
    let sent = results.iter().filter(|r| r.message.is_some()).count();
    reply(
        StatusCode::OK,
        &BroadcastReply {
            sent,
            failed: results.len() - sent,
            results,
        },
    )
}
