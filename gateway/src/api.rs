//! The HTTP API's inbox resources: contacts, inboxes and conversations of the caller's tenant
//! (bearer token of an `admin`, `agent` or `service`). Every body is JSON; every error is a
//! status with `{"error": kind, "message": details}`.
//!
//! - `POST /api/contacts`: creates or replaces a contact (`201` created, `200` replaced).
//! - `POST /api/inboxes`: creates or replaces an inbox with its channel.
//! - `POST /api/conversations`: opens a `support` or `prospect` conversation (a room and its
//!   inbox record). A second prospect conversation for a contact that has one reopens that one
//!   and adds the new participants instead (`200`, `"reopened": true`).

use std::collections::BTreeMap;
use std::sync::Arc;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use storage::records::{
    self, Channel, Contact, ContactConversation, Conversation, Inbox, RecordBody, Versioned,
};
use storage::{NewRoom, RoomKey, RoomKind, Store, Timestamp};

use crate::auth::{Claims, Role};
use crate::inbox::{self, AgentView, ChangeKind, ConversationPatch};
use crate::server::{api_error, authenticate, json_response, Body, Shared};
use crate::shard::{shard_of, ShardCommand};

/// Largest request body.
pub const MAX_API_BODY: usize = 64 * 1024;
const MAX_ID_BYTES: usize = 128;
const MAX_NAME_BYTES: usize = 256;

/// Authenticates a team role and reads its JSON body; on failure the response to send.
pub(crate) async fn team_request<T: DeserializeOwned>(
    shared: &Shared,
    req: Request<Incoming>,
    what: &str,
) -> Result<(Claims, T), Response<Body>> {
    let claims = authenticate(shared, &req).map_err(|response| *response)?;
    if !matches!(claims.role, Role::Admin | Role::Agent | Role::Service) {
        return Err(api_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("only admin, agent or service tokens may create {what}"),
        ));
    }
    let body = Limited::new(req.into_body(), MAX_API_BODY)
        .collect()
        .await
        .map_err(|_| {
            api_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "body larger than 64 KiB",
            )
        })?
        .to_bytes();
    let mut json = serde_json::Deserializer::from_slice(&body);
    let body = serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let path = e.path().to_string();
        bad_request(if path == "." {
            format!("invalid body: {}", e.into_inner())
        } else {
            format!("invalid body.{path}: {}", e.into_inner())
        })
    })?;
    Ok((claims, body))
}

fn bad_request(message: impl Into<String>) -> Response<Body> {
    api_error(StatusCode::BAD_REQUEST, "bad_request", message)
}

fn not_found(message: &str) -> Response<Body> {
    api_error(StatusCode::NOT_FOUND, "not_found", message)
}

/// A store failure: the detail names tables and files, so it goes to the log, not the client.
fn unavailable(error: &storage::Error, tenant: &str, what: &str) -> Response<Body> {
    tracing::warn!(error = %error, tenant, "{what} failed in storage");
    api_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "storage unavailable, retry later",
    )
}

/// An id the caller gave (1–128 bytes), or a fresh ULID.
fn id_or_new(id: Option<String>, field: &str) -> Result<String, String> {
    match id {
        None => Ok(ulid::Ulid::new().to_string()),
        Some(id) if !id.is_empty() && id.len() <= MAX_ID_BYTES => Ok(id),
        Some(_) => Err(format!("{field} must be 1 to 128 bytes")),
    }
}

fn check_name(name: &str, field: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(format!("{field} must be 1 to 256 bytes"));
    }
    Ok(())
}

/// Creates the record or replaces it, keeping when it was first created; `true` when created.
async fn upsert<T, S>(
    store: &S,
    tenant: &str,
    id: &str,
    mut value: T,
    created_at: impl Fn(&mut T) -> &mut Timestamp,
) -> storage::Result<(T, bool)>
where
    T: RecordBody + Clone,
    S: Store,
{
    let mut created = false;
    let saved = records::update::<T, _, _>(store, tenant, id, |current| {
        created = current.is_none();
        if let Some(current) = current {
            let mut current = current.clone();
            *created_at(&mut value) = *created_at(&mut current);
        }
        Ok(Some(value.clone()))
    })
    .await?;
    let saved = saved
        .map(|s| s.value)
        .ok_or_else(|| storage::Error::NotApplied("the record was not written".to_owned()))?;
    Ok((saved, created))
}

#[derive(Serialize)]
struct Saved<T: Serialize> {
    #[serde(flatten)]
    value: T,
    created: bool,
}

fn saved<T: Serialize>(value: T, created: bool) -> Response<Body> {
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    json_response(status, &Saved { value, created })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContactBody {
    contact_id: Option<String>,
    name: String,
    email: Option<String>,
    phone: Option<String>,
    avatar_url: Option<String>,
    #[serde(default)]
    external_ids: BTreeMap<String, String>,
    #[serde(default)]
    custom_attributes: serde_json::Map<String, serde_json::Value>,
}

/// `POST /api/contacts`.
pub(crate) async fn put_contact(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let (claims, body) = match team_request::<ContactBody>(&shared, req, "contacts").await {
        Ok(request) => request,
        Err(response) => return response,
    };
    let contact_id = match id_or_new(body.contact_id, "contact_id") {
        Ok(id) => id,
        Err(message) => return bad_request(message),
    };
    if let Err(message) = check_name(&body.name, "name") {
        return bad_request(message);
    }
    let contact = Contact {
        contact_id: contact_id.clone(),
        name: body.name,
        email: body.email,
        phone: body.phone,
        avatar_url: body.avatar_url,
        external_ids: body.external_ids,
        custom_attributes: body.custom_attributes,
        created_at: Timestamp::now(),
    };
    match upsert(&shared.store, &claims.tenant, &contact_id, contact, |c| {
        &mut c.created_at
    })
    .await
    {
        Ok((contact, created)) => saved(contact, created),
        Err(storage::Error::Invalid(message)) => bad_request(message),
        Err(e) => unavailable(&e, &claims.tenant, "saving a contact"),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InboxBody {
    inbox_id: Option<String>,
    name: String,
    channel: Channel,
}

/// `POST /api/inboxes`.
pub(crate) async fn put_inbox(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let (claims, body) = match team_request::<InboxBody>(&shared, req, "inboxes").await {
        Ok(request) => request,
        Err(response) => return response,
    };
    let inbox_id = match id_or_new(body.inbox_id, "inbox_id") {
        Ok(id) => id,
        Err(message) => return bad_request(message),
    };
    if let Err(message) = check_name(&body.name, "name") {
        return bad_request(message);
    }
    let inbox = Inbox {
        inbox_id: inbox_id.clone(),
        name: body.name,
        channel: body.channel,
        created_at: Timestamp::now(),
    };
    match upsert(&shared.store, &claims.tenant, &inbox_id, inbox, |i| {
        &mut i.created_at
    })
    .await
    {
        Ok((inbox, created)) => saved(inbox, created),
        Err(storage::Error::Invalid(message)) => bad_request(message),
        Err(e) => unavailable(&e, &claims.tenant, "saving an inbox"),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConversationBody {
    room_id: Option<String>,
    kind: RoomKind,
    contact_id: Option<String>,
    inbox_id: Option<String>,
    title: Option<String>,
    #[serde(default)]
    participants: Vec<String>,
}

#[derive(Serialize)]
struct ConversationReply<'a> {
    #[serde(flatten)]
    view: AgentView<'a>,
    created: bool,
    reopened: bool,
}

/// `POST /api/conversations`.
pub(crate) async fn open_conversation(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Response<Body> {
    let (claims, body) = match team_request::<ConversationBody>(&shared, req, "conversations").await
    {
        Ok(request) => request,
        Err(response) => return response,
    };
    let tenant = claims.tenant.as_str();
    if body.kind == RoomKind::Team {
        return bad_request("kind must be support or prospect");
    }
    if let Some(title) = &body.title {
        if let Err(message) = check_name(title, "title") {
            return bad_request(message);
        }
    }
    if body.participants.len() > inbox::MAX_ADDED_PARTICIPANTS
        || body
            .participants
            .iter()
            .any(|p| p.is_empty() || p.len() > inbox::MAX_USER_ID_BYTES)
    {
        return bad_request("participants: at most 50 user ids of 1 to 256 bytes");
    }
    let store = &shared.store;
    let contact = match &body.contact_id {
        None => None,
        Some(id) => match records::load::<Contact, _>(store, tenant, id).await {
            Ok(Some(contact)) => Some(contact.value),
            Ok(None) => return not_found("no such contact"),
            Err(e) => return unavailable(&e, tenant, "reading a contact"),
        },
    };
    if let Some(id) = &body.inbox_id {
        match records::load::<Inbox, _>(store, tenant, id).await {
            Ok(Some(_)) => {}
            Ok(None) => return not_found("no such inbox"),
            Err(e) => return unavailable(&e, tenant, "reading an inbox"),
        }
    }
    let mut room_id = match id_or_new(body.room_id, "room_id") {
        Ok(id) => id,
        Err(message) => return bad_request(message),
    };
    // A prospect conversation is one per contact: the contact's pointer is claimed first, and
    // whoever loses the claim opens the same room. Every request then makes sure the room and
    // its conversation exist (idempotently: a claim whose request stopped halfway is finished
    // by the next one), so of racing requests exactly one creates and the others reopen.
    let mut one_per_contact = false;
    if let (RoomKind::Prospect, Some(contact)) = (body.kind, &contact) {
        one_per_contact = true;
        let pointer_id = ContactConversation::id(&contact.contact_id, RoomKind::Prospect);
        let claim = Versioned {
            value: ContactConversation {
                room_id: room_id.clone(),
            },
            version: 0,
        };
        match records::save(store, tenant, &pointer_id, claim).await {
            Ok(_) => {}
            Err(storage::Error::VersionConflict { .. }) => {
                match records::load::<ContactConversation, _>(store, tenant, &pointer_id).await {
                    Ok(Some(pointer)) => room_id = pointer.value.room_id,
                    Ok(None) => {
                        return unavailable(
                            &storage::Error::NotApplied("the contact's conversation moved".into()),
                            tenant,
                            "finding a contact's conversation",
                        )
                    }
                    Err(e) => return unavailable(&e, tenant, "finding a contact's conversation"),
                }
            }
            Err(e) => return unavailable(&e, tenant, "claiming a contact's conversation"),
        }
    }
    let room = RoomKey::new(tenant, &room_id);
    let mut conversation = Conversation::new(&room, body.kind, contact.as_ref());
    conversation.inbox_id = body.inbox_id;
    if let Some(title) = body.title {
        conversation.title = title;
    }
    let new_room = NewRoom {
        room_id: room_id.clone(),
        tenant_id: tenant.to_owned(),
        kind: body.kind,
        title: conversation.title.clone(),
        status: "active".to_owned(),
        participants: body.participants.clone(),
        created_at: conversation.created_at,
    };
    match store.create_room(new_room).await {
        Ok((room, _)) if room.kind == RoomKind::Team => {
            return api_error(
                StatusCode::CONFLICT,
                "conflict",
                "room_id names a team room of this tenant",
            )
        }
        Ok(_) => {}
        Err(e) => return unavailable(&e, tenant, "creating a conversation's room"),
    }
    let first = Versioned {
        value: conversation,
        version: 0,
    };
    match records::save(store, tenant, &room_id, first).await {
        Ok(saved) => {
            for user in &body.participants {
                if let Err(e) = store.add_participant(&room, user).await {
                    return unavailable(&e, tenant, "adding a participant");
                }
            }
            reply_and_announce(
                &shared,
                &claims,
                room,
                saved.value,
                body.participants,
                true,
                false,
            )
            .await
        }
        // It exists: a prospect conversation is reopened with the new participants; any other
        // is answered as it is, with the participants added.
        Err(storage::Error::VersionConflict { .. }) => {
            let patch = ConversationPatch {
                is_open: one_per_contact.then_some(true),
                add_participants: body.participants.clone(),
                ..Default::default()
            };
            let reopened = one_per_contact;
            let updated = if patch == ConversationPatch::default() {
                Ok(None)
            } else {
                inbox::update_conversation(store, &room, &patch).await
            };
            // Nothing to change (open already, participants there): as it is.
            let result = match updated {
                Ok(None) => records::load::<Conversation, _>(store, tenant, &room_id)
                    .await
                    .map(|c| c.map(|c| c.value)),
                other => other,
            };
            match result {
                Ok(Some(existing)) => {
                    reply_and_announce(
                        &shared,
                        &claims,
                        room,
                        existing,
                        body.participants,
                        false,
                        reopened,
                    )
                    .await
                }
                Ok(None) => unavailable(
                    &storage::Error::NotApplied("the conversation moved".into()),
                    tenant,
                    "opening a conversation",
                ),
                Err(e) => unavailable(&e, tenant, "opening a conversation"),
            }
        }
        Err(e) => unavailable(&e, tenant, "opening a conversation"),
    }
}

/// Answers with the conversation and has the room's shard tell its members and the inbox
/// (and learn the participants added, if the room is loaded there).
#[allow(clippy::too_many_arguments)]
async fn reply_and_announce(
    shared: &Arc<Shared>,
    claims: &Claims,
    room: RoomKey,
    conversation: Conversation,
    added: Vec<String>,
    created: bool,
    reopened: bool,
) -> Response<Body> {
    let participants = match shared.store.room(&room).await {
        Ok(Some(stored)) => stored.participants,
        Ok(None) | Err(_) => Vec::new(),
    };
    let response = json_response(
        if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        &ConversationReply {
            view: AgentView {
                conversation: &conversation,
                participants: &participants,
            },
            created,
            reopened,
        },
    );
    if created || reopened {
        let change = if created {
            ChangeKind::Created
        } else {
            ChangeKind::Reopened
        };
        let shard = &shared.shards[shard_of(&room, shared.shards.len())];
        let actor = claims.sub.clone();
        let work = ShardCommand::Run(Box::new(move |shard| {
            shard.add_participants(&room, &added);
            shard.conversation_event(&room, &conversation, (change, &actor), None, true);
        }));
        // The answer does not wait for the events; a full shard queue drops them (logged).
        if shard.commands.try_send(work).is_err() {
            tracing::warn!("a conversation event was dropped: the room's shard is overloaded");
        }
    }
    response
}
