//! Records of the caller's tenant: rooms, contacts, inboxes (with their channel) and opening
//! conversations.
//!
//! - `POST /api/v1/rooms`: creates a room (`201`), or answers the existing one (`200`).
//! - `POST /api/v1/contacts`, `GET /api/v1/contacts/{id}`: contacts (team roles).
//! - `POST /api/v1/inboxes`, `GET /api/v1/inboxes/{id}`: inboxes and their channel (admins
//!   write, the team reads). A web-widget inbox claims its widget key across tenants.
//! - `POST /api/v1/conversations`: opens a `support` or `prospect` conversation (a room and
//!   its inbox record). A second prospect conversation for a contact that has one reopens that
//!   one and adds the new participants instead (`200`, `"reopened": true`).

use std::collections::BTreeMap;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::{Deserialize, Serialize};
use storage::records::{
    self, Channel, ChannelKey, Contact, ContactAddress, ContactConversation, Conversation, Inbox,
    RecordBody, Versioned,
};
use storage::{NewRoom, RoomKey, RoomKind, Store, Timestamp};
use utoipa::ToSchema;

use super::{caller, json_body, reply, require, ApiError, ApiResult, ErrorBody, TEAM};
use crate::auth::{Claims, Role};
use crate::inbox::{self, AgentView, ChangeKind, ConversationPatch};
use crate::server::Shared;
use crate::shard::{shard_of, ShardCommand};

const MAX_ID_BYTES: usize = 128;
const MAX_NAME_BYTES: usize = 256;
/// Most participants a room is created with.
const MAX_ROOM_PARTICIPANTS: usize = 1000;

/// An id the caller gave (1–128 bytes), or a fresh ULID.
pub(crate) fn id_or_new(id: Option<String>, field: &str) -> Result<String, ApiError> {
    match id {
        None => Ok(ulid::Ulid::new().to_string()),
        Some(id) if !id.is_empty() && id.len() <= MAX_ID_BYTES => Ok(id),
        Some(_) => Err(ApiError::bad_request(format!(
            "{field} must be 1 to 128 bytes"
        ))),
    }
}

fn check_name(name: &str, field: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(ApiError::bad_request(format!(
            "{field} must be 1 to 256 bytes"
        )));
    }
    Ok(())
}

fn created_or_ok(created: bool) -> StatusCode {
    if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
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

/// A saved record and whether this request created it.
#[derive(Serialize, ToSchema)]
pub(crate) struct Saved<T: Serialize + ToSchema> {
    #[serde(flatten)]
    value: T,
    created: bool,
}

// ---------------------------------------------------------------------------------------------
// Rooms

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateRoomBody {
    /// 1–128 bytes; a ULID when absent.
    #[schema(min_length = 1, max_length = 128)]
    room_id: Option<String>,
    /// `team`, `support` or `prospect`.
    #[schema(pattern = "^(team|support|prospect)$")]
    kind: String,
    title: Option<String>,
    status: Option<String>,
    #[serde(default)]
    participants: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct RoomBody<'a> {
    room_id: &'a str,
    tenant_id: &'a str,
    kind: &'static str,
    title: &'a str,
    status: &'a str,
    participants: &'a [String],
    created_at: Timestamp,
    last_seq: u64,
    created: bool,
}

/// Creates a room of the caller's tenant (team roles), or answers the one with that id.
#[utoipa::path(post, path = "/api/v1/rooms", tag = "rooms", request_body = CreateRoomBody,
    responses(
        (status = 201, description = "Created", body = RoomBody),
        (status = 200, description = "It existed", body = RoomBody),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 503, body = ErrorBody),
    ))]
pub(crate) async fn create_room(shared: Arc<Shared>, req: Request<Incoming>) -> ApiResult {
    let claims = caller(&shared, &req)?;
    require(&claims, TEAM, "create rooms")?;
    let body: CreateRoomBody = json_body(req).await?;
    let kind = RoomKind::parse(&body.kind)
        .ok_or_else(|| ApiError::bad_request("kind must be team, support or prospect"))?;
    let room_id = body
        .room_id
        .unwrap_or_else(|| ulid::Ulid::new().to_string());
    if room_id.is_empty() || room_id.len() > crate::codec::envelope::MAX_ROOM_ID_BYTES {
        return Err(ApiError::bad_request("room_id must be 1 to 128 bytes"));
    }
    if body.participants.len() > MAX_ROOM_PARTICIPANTS
        || body
            .participants
            .iter()
            .any(|p| p.is_empty() || p.len() > MAX_NAME_BYTES)
    {
        return Err(ApiError::bad_request(
            "at most 1000 participants of 1 to 256 bytes",
        ));
    }
    let new_room = NewRoom {
        title: body.title.unwrap_or_else(|| room_id.clone()),
        room_id,
        tenant_id: claims.tenant.clone(),
        kind,
        status: body.status.unwrap_or_else(|| "active".to_owned()),
        participants: body.participants,
        created_at: Timestamp::now(),
    };
    // Keyed by the caller's tenant: an id used by another tenant is free here.
    let (room, created) = shared
        .store
        .create_room(new_room)
        .await
        .map_err(|e| ApiError::storage(&e, &claims.tenant, "creating a room"))?;
    reply(
        created_or_ok(created),
        &RoomBody {
            room_id: &room.room_id,
            tenant_id: &room.tenant_id,
            kind: room.kind.as_str(),
            title: &room.title,
            status: &room.status,
            participants: &room.participants,
            created_at: room.created_at,
            last_seq: room.last_seq,
            created,
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Contacts

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ContactBody {
    /// 1–128 bytes; a ULID when absent. An existing contact is replaced.
    #[schema(min_length = 1, max_length = 128)]
    contact_id: Option<String>,
    #[schema(min_length = 1, max_length = 256)]
    name: String,
    email: Option<String>,
    phone: Option<String>,
    avatar_url: Option<String>,
    #[serde(default)]
    external_ids: BTreeMap<String, String>,
    #[serde(default)]
    #[schema(value_type = Object, required = false)]
    custom_attributes: serde_json::Map<String, serde_json::Value>,
}

/// Saves a contact, created now or replaced (`created_at` kept), and points its phone number
/// and email address at it unless another contact has them already.
pub(crate) async fn save_contact(
    shared: &Shared,
    tenant: &str,
    contact: Contact,
) -> Result<(Contact, bool), ApiError> {
    let id = contact.contact_id.clone();
    let saved = upsert(&shared.store, tenant, &id, contact, |c| &mut c.created_at)
        .await
        .map_err(|e| match e {
            storage::Error::Invalid(message) => ApiError::bad_request(message),
            e => ApiError::storage(&e, tenant, "saving a contact"),
        })?;
    let addresses = [
        saved.0.phone.as_deref().map(ContactAddress::phone),
        saved.0.email.as_deref().map(ContactAddress::email),
    ];
    for address in addresses.into_iter().flatten() {
        let pointer = Versioned {
            value: ContactAddress {
                contact_id: id.clone(),
            },
            version: 0,
        };
        match records::save(&shared.store, tenant, &address, pointer).await {
            // Taken: the first contact with the address keeps it.
            Ok(_) | Err(storage::Error::VersionConflict { .. }) => {}
            Err(e) => return Err(ApiError::storage(&e, tenant, "saving a contact's address")),
        }
    }
    Ok(saved)
}

/// Creates or replaces a contact of the caller's tenant (team roles).
#[utoipa::path(post, path = "/api/v1/contacts", tag = "contacts", request_body = ContactBody,
    responses(
        (status = 201, description = "Created", body = Saved<Contact>),
        (status = 200, description = "Replaced", body = Saved<Contact>),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 503, body = ErrorBody),
    ))]
pub(crate) async fn put_contact(shared: Arc<Shared>, req: Request<Incoming>) -> ApiResult {
    let claims = caller(&shared, &req)?;
    require(&claims, TEAM, "write contacts")?;
    let body: ContactBody = json_body(req).await?;
    let contact_id = id_or_new(body.contact_id, "contact_id")?;
    check_name(&body.name, "name")?;
    let contact = Contact {
        contact_id,
        name: body.name,
        email: body.email,
        phone: body.phone,
        avatar_url: body.avatar_url,
        external_ids: body.external_ids,
        custom_attributes: body.custom_attributes,
        created_at: Timestamp::now(),
    };
    let (value, created) = save_contact(&shared, &claims.tenant, contact).await?;
    reply(created_or_ok(created), &Saved { value, created })
}

/// Reads one record of the caller's tenant: `404` when it has none by that id.
async fn read<T: RecordBody>(shared: &Shared, claims: &Claims, id: &str) -> Result<T, ApiError> {
    match records::load::<T, _>(&shared.store, &claims.tenant, id).await {
        Ok(Some(found)) => Ok(found.value),
        Ok(None) => Err(ApiError::not_found(format!("no such {}", T::KIND.as_str()))),
        Err(e) => Err(ApiError::storage(&e, &claims.tenant, "reading a record")),
    }
}

/// A contact of the caller's tenant (team roles).
#[utoipa::path(get, path = "/api/v1/contacts/{contact_id}", tag = "contacts",
    params(("contact_id" = String, Path)),
    responses(
        (status = 200, body = Contact),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody),
    ))]
pub(crate) async fn get_contact(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    id: &str,
) -> ApiResult {
    let claims = caller(&shared, &req)?;
    require(&claims, TEAM, "read contacts")?;
    let contact: Contact = read(&shared, &claims, id).await?;
    reply(StatusCode::OK, &contact)
}

/// Lists' page size unless `limit` says otherwise, and its largest.
const DEFAULT_LIST: u32 = 50;
const MAX_LIST: u32 = 200;

/// Where a walk through a list is: the time its first page was read at and the last place
/// answered (a `next` cursor, base64url JSON).
#[derive(Serialize, Deserialize)]
struct ListCursor {
    as_of: i64,
    key: i64,
    id: String,
}

/// A page of the caller's tenant's records of one kind, newest first; `next` continues it.
#[derive(Serialize, ToSchema)]
pub(crate) struct ListReply<T: Serialize + ToSchema> {
    items: Vec<T>,
    /// Pass as `next` for the following page; `null` at the end.
    next: Option<String>,
}

/// `GET` list parameters.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(crate) struct ListParams {
    /// 1–200, default 50.
    #[param(minimum = 1, maximum = 200)]
    limit: Option<u32>,
    /// The previous page's `next`.
    next: Option<String>,
}

/// A page of `T` records of the caller's tenant, from `?limit=&next=`.
async fn list<T: RecordBody + Serialize + ToSchema>(
    shared: &Shared,
    claims: &Claims,
    req: &Request<Incoming>,
) -> ApiResult {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut limit = DEFAULT_LIST;
    let mut cursor: Option<ListCursor> = None;
    for (key, value) in super::form_pairs(req.uri().query().unwrap_or("")) {
        match key.as_str() {
            "limit" => {
                limit = value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=MAX_LIST).contains(n))
                    .ok_or_else(|| ApiError::bad_request("limit must be 1 to 200"))?;
            }
            "next" => {
                let parsed = b64
                    .decode(value.as_bytes())
                    .ok()
                    .and_then(|json| serde_json::from_slice::<ListCursor>(&json).ok())
                    .ok_or_else(|| ApiError::bad_request("next is not a cursor of this list"))?;
                cursor = Some(parsed);
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {other:?}"
                )))
            }
        }
    }
    if let Some(cursor) = &cursor {
        // The store keeps a list's old places this long; past it a walk could skip records.
        let age = Timestamp::now().0 - cursor.as_of;
        if age > records::LIST_SNAPSHOT_MILLIS - 30_000 {
            return Err(ApiError::bad_request(
                "next has expired: start the list again",
            ));
        }
    }
    let query = records::ListQuery {
        as_of: cursor.as_ref().map(|c| Timestamp(c.as_of)),
        descending: true,
        after: cursor.map(|c| (c.key, c.id)),
        limit,
    };
    let tenant = claims.tenant.as_str();
    let page = shared
        .store
        .list_records(tenant, T::KIND, query)
        .await
        .map_err(|e| ApiError::storage(&e, tenant, "listing records"))?;
    let full = page.entries.len() == limit as usize;
    let mut items = Vec::with_capacity(page.entries.len());
    for entry in &page.entries {
        match serde_json::from_str::<T>(&entry.record.body) {
            Ok(item) => items.push(item),
            Err(e) => {
                tracing::warn!(error = %e, id = %entry.record.key.id, "an unreadable record was left out of a list")
            }
        }
    }
    let next = page.entries.last().filter(|_| full).map(|last| {
        let cursor = ListCursor {
            as_of: page.as_of.0,
            key: last.list_key,
            id: last.record.key.id.clone(),
        };
        b64.encode(serde_json::to_vec(&cursor).unwrap_or_default())
    });
    reply(StatusCode::OK, &ListReply { items, next })
}

/// The caller's tenant's contacts, newest first (team roles).
#[utoipa::path(get, path = "/api/v1/contacts", tag = "contacts", params(ListParams),
    responses(
        (status = 200, body = ListReply<Contact>),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody),
    ))]
pub(crate) async fn list_contacts(shared: Arc<Shared>, req: Request<Incoming>) -> ApiResult {
    let claims = caller(&shared, &req)?;
    require(&claims, TEAM, "list contacts")?;
    list::<Contact>(&shared, &claims, &req).await
}

// ---------------------------------------------------------------------------------------------
// Inboxes

/// The caller's tenant's inboxes, newest first (team roles).
#[utoipa::path(get, path = "/api/v1/inboxes", tag = "inboxes", params(ListParams),
    responses(
        (status = 200, body = ListReply<Inbox>),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody),
    ))]
pub(crate) async fn list_inboxes(shared: Arc<Shared>, req: Request<Incoming>) -> ApiResult {
    let claims = caller(&shared, &req)?;
    require(&claims, TEAM, "list inboxes")?;
    list::<Inbox>(&shared, &claims, &req).await
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct InboxBody {
    /// 1–128 bytes; a ULID when absent. An existing inbox is replaced.
    #[schema(min_length = 1, max_length = 128)]
    inbox_id: Option<String>,
    #[schema(min_length = 1, max_length = 256)]
    name: String,
    channel: Channel,
}

/// Creates or replaces an inbox and its channel (admins). A web widget's key must be free:
/// another inbox's key is `409`.
#[utoipa::path(post, path = "/api/v1/inboxes", tag = "inboxes", request_body = InboxBody,
    responses(
        (status = 201, description = "Created", body = Saved<Inbox>),
        (status = 200, description = "Replaced", body = Saved<Inbox>),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub(crate) async fn put_inbox(shared: Arc<Shared>, req: Request<Incoming>) -> ApiResult {
    let claims = caller(&shared, &req)?;
    require(&claims, &[Role::Admin], "write inboxes")?;
    let body: InboxBody = json_body(req).await?;
    let inbox_id = id_or_new(body.inbox_id, "inbox_id")?;
    check_name(&body.name, "name")?;
    let tenant = claims.tenant.as_str();
    if let Channel::WebWidget { widget_key, .. } = &body.channel {
        if widget_key.len() < 8 || widget_key.len() > MAX_ID_BYTES {
            return Err(ApiError::bad_request(
                "channel.widget_key must be 8 to 128 bytes",
            ));
        }
    }
    claim_channel_key(&shared, tenant, &inbox_id, &body.channel).await?;
    let inbox = Inbox {
        inbox_id: inbox_id.clone(),
        name: body.name,
        channel: body.channel,
        created_at: Timestamp::now(),
    };
    let (value, created) = upsert(&shared.store, tenant, &inbox_id, inbox, |i| {
        &mut i.created_at
    })
    .await
    .map_err(|e| match e {
        storage::Error::Invalid(message) => ApiError::bad_request(message),
        e => ApiError::storage(&e, tenant, "saving an inbox"),
    })?;
    reply(created_or_ok(created), &Saved { value, created })
}

/// Points the channel's public address (widget key, number, email address) at the inbox,
/// unless another inbox uses it (`409`). An address whose inbox no longer uses it is free again.
async fn claim_channel_key(
    shared: &Shared,
    tenant: &str,
    inbox_id: &str,
    channel: &Channel,
) -> Result<(), ApiError> {
    let store = &shared.store;
    let key = ChannelKey::id(channel);
    let mut holder_checked: Option<(String, String)> = None;
    let mut taken = false;
    for _ in 0..records::MAX_UPDATE_ROUNDS {
        let current = records::load::<ChannelKey, _>(store, ChannelKey::TENANT, &key)
            .await
            .map_err(|e| ApiError::storage(&e, tenant, "reading a channel key"))?;
        let version = current.as_ref().map_or(0, |c| c.version);
        if let Some(current) = &current {
            let holder = (
                current.value.tenant_id.clone(),
                current.value.inbox_id.clone(),
            );
            if holder.0 == tenant && holder.1 == inbox_id {
                return Ok(());
            }
            if holder_checked.as_ref() != Some(&holder) {
                // Held by another inbox: taken while that inbox still uses it.
                let inbox = records::load::<Inbox, _>(store, &holder.0, &holder.1)
                    .await
                    .map_err(|e| ApiError::storage(&e, tenant, "reading an inbox"))?;
                taken = inbox.is_some_and(|inbox| ChannelKey::id(&inbox.value.channel) == key);
                holder_checked = Some(holder);
            }
            if taken {
                return Err(ApiError::conflict(
                    "the channel's widget key, number or address is used by another inbox",
                ));
            }
        }
        let claim = Versioned {
            value: ChannelKey {
                tenant_id: tenant.to_owned(),
                inbox_id: inbox_id.to_owned(),
            },
            version,
        };
        match records::save(store, ChannelKey::TENANT, &key, claim).await {
            Ok(_) => return Ok(()),
            Err(storage::Error::VersionConflict { .. }) => continue,
            Err(e) => return Err(ApiError::storage(&e, tenant, "claiming a channel key")),
        }
    }
    Err(ApiError::conflict(
        "the channel is being claimed by another request, retry",
    ))
}

/// An inbox of the caller's tenant (team roles).
#[utoipa::path(get, path = "/api/v1/inboxes/{inbox_id}", tag = "inboxes",
    params(("inbox_id" = String, Path)),
    responses(
        (status = 200, body = Inbox),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody),
    ))]
pub(crate) async fn get_inbox(shared: Arc<Shared>, req: Request<Incoming>, id: &str) -> ApiResult {
    let claims = caller(&shared, &req)?;
    require(&claims, TEAM, "read inboxes")?;
    let inbox: Inbox = read(&shared, &claims, id).await?;
    reply(StatusCode::OK, &inbox)
}

// ---------------------------------------------------------------------------------------------
// Opening conversations

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConversationBody {
    /// 1–128 bytes; a ULID when absent.
    room_id: Option<String>,
    /// `support` or `prospect`.
    kind: RoomKind,
    contact_id: Option<String>,
    inbox_id: Option<String>,
    title: Option<String>,
    /// User ids to add (at most 50).
    #[serde(default)]
    participants: Vec<String>,
}

/// An opened conversation as the team sees it.
#[derive(Serialize, ToSchema)]
pub(crate) struct ConversationReply<'a> {
    #[serde(flatten)]
    #[schema(inline)]
    view: AgentView<'a>,
    created: bool,
    reopened: bool,
}

/// What to do with a conversation that exists already.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum WhenOpen {
    /// Add the new participants.
    AddParticipants,
    /// One per contact and kind: reopen it and add the participants.
    Reopen,
    /// One per contact and kind: answer it as it is (a widget session resuming).
    Resume,
}

/// A conversation to open.
pub(crate) struct Opening {
    pub room_id: Option<String>,
    pub kind: RoomKind,
    pub contact: Option<Contact>,
    pub inbox_id: Option<String>,
    pub title: Option<String>,
    pub participants: Vec<String>,
    pub when_open: WhenOpen,
}

/// An opened conversation.
pub(crate) struct Opened {
    pub conversation: Conversation,
    pub participants: Vec<String>,
    pub created: bool,
    pub reopened: bool,
}

/// Opens a support or prospect conversation of `claims`' tenant (its room and its record),
/// announcing it to its members and the inbox.
pub(crate) async fn open(
    shared: &Arc<Shared>,
    claims: &Claims,
    opening: Opening,
) -> Result<Opened, ApiError> {
    let tenant = claims.tenant.as_str();
    let store = &shared.store;
    let mut room_id = id_or_new(opening.room_id, "room_id")?;
    // One per contact: the contact's pointer is claimed first, and whoever loses the claim
    // opens the same room. Every request then makes sure the room and its conversation exist
    // (idempotently: a claim whose request stopped halfway is finished by the next one), so of
    // racing requests exactly one creates and the others reopen.
    let one_per_contact = opening.when_open != WhenOpen::AddParticipants;
    if let (true, Some(contact)) = (one_per_contact, &opening.contact) {
        let pointer_id = ContactConversation::id(&contact.contact_id, opening.kind);
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
                        let moved = storage::Error::NotApplied("the pointer moved".into());
                        return Err(ApiError::storage(&moved, tenant, "finding a conversation"));
                    }
                    Err(e) => return Err(ApiError::storage(&e, tenant, "finding a conversation")),
                }
            }
            Err(e) => return Err(ApiError::storage(&e, tenant, "claiming a conversation")),
        }
    }
    let room = RoomKey::new(tenant, &room_id);
    let mut conversation = Conversation::new(&room, opening.kind, opening.contact.as_ref());
    conversation.inbox_id = opening.inbox_id;
    if let Some(title) = opening.title {
        conversation.title = title;
    }
    let new_room = NewRoom {
        room_id: room_id.clone(),
        tenant_id: tenant.to_owned(),
        kind: opening.kind,
        title: conversation.title.clone(),
        status: "active".to_owned(),
        participants: opening.participants.clone(),
        created_at: conversation.created_at,
    };
    match store.create_room(new_room).await {
        Ok((room, _)) if room.kind == RoomKind::Team => {
            return Err(ApiError::conflict(
                "room_id names a team room of this tenant",
            ))
        }
        Ok(_) => {}
        Err(e) => {
            return Err(ApiError::storage(
                &e,
                tenant,
                "creating a conversation's room",
            ))
        }
    }
    let first = Versioned {
        value: conversation,
        version: 0,
    };
    let (conversation, created, reopened) =
        match records::save(store, tenant, &room_id, first).await {
            Ok(saved) => {
                for user in &opening.participants {
                    store
                        .add_participant(&room, user)
                        .await
                        .map_err(|e| ApiError::storage(&e, tenant, "adding a participant"))?;
                }
                (saved.value, true, false)
            }
            // It exists: reopened, resumed or joined by the new participants.
            Err(storage::Error::VersionConflict { .. }) => {
                let patch = ConversationPatch {
                    is_open: (opening.when_open == WhenOpen::Reopen).then_some(true),
                    add_participants: opening.participants.clone(),
                    ..Default::default()
                };
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
                    Ok(Some(existing)) => (existing, false, opening.when_open == WhenOpen::Reopen),
                    Ok(None) => {
                        let moved = storage::Error::NotApplied("the conversation moved".into());
                        return Err(ApiError::storage(&moved, tenant, "opening a conversation"));
                    }
                    Err(e) => return Err(ApiError::storage(&e, tenant, "opening a conversation")),
                }
            }
            Err(e) => return Err(ApiError::storage(&e, tenant, "opening a conversation")),
        };
    let participants = match store.room(&room).await {
        Ok(Some(stored)) => stored.participants,
        Ok(None) | Err(_) => Vec::new(),
    };
    if created || reopened {
        announce(
            shared,
            claims,
            room,
            &conversation,
            opening.participants,
            created,
        );
    }
    Ok(Opened {
        conversation,
        participants,
        created,
        reopened,
    })
}

/// Opens a support or prospect conversation (team roles). The contact and the inbox must
/// exist. A prospect conversation for a contact that has one is not duplicated: that one is
/// reopened with the participants added (`200`, `"reopened": true`).
#[utoipa::path(post, path = "/api/v1/conversations", tag = "conversations",
    request_body = ConversationBody,
    responses(
        (status = 201, description = "Opened", body = ConversationReply),
        (status = 200, description = "It existed (reopened when a prospect's)", body = ConversationReply),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 503, body = ErrorBody),
    ))]
pub(crate) async fn open_conversation(shared: Arc<Shared>, req: Request<Incoming>) -> ApiResult {
    let claims = caller(&shared, &req)?;
    require(&claims, TEAM, "open conversations")?;
    let body: ConversationBody = json_body(req).await?;
    if body.kind == RoomKind::Team {
        return Err(ApiError::bad_request("kind must be support or prospect"));
    }
    if let Some(title) = &body.title {
        check_name(title, "title")?;
    }
    if body.participants.len() > inbox::MAX_ADDED_PARTICIPANTS
        || body
            .participants
            .iter()
            .any(|p| p.is_empty() || p.len() > inbox::MAX_USER_ID_BYTES)
    {
        return Err(ApiError::bad_request(
            "participants: at most 50 user ids of 1 to 256 bytes",
        ));
    }
    let contact = match &body.contact_id {
        None => None,
        Some(id) => Some(read::<Contact>(&shared, &claims, id).await?),
    };
    if let Some(id) = &body.inbox_id {
        read::<Inbox>(&shared, &claims, id).await?;
    }
    let when_open = match (body.kind, &contact) {
        (RoomKind::Prospect, Some(_)) => WhenOpen::Reopen,
        _ => WhenOpen::AddParticipants,
    };
    let opened = open(
        &shared,
        &claims,
        Opening {
            room_id: body.room_id,
            kind: body.kind,
            contact,
            inbox_id: body.inbox_id,
            title: body.title,
            participants: body.participants,
            when_open,
        },
    )
    .await?;
    reply(
        created_or_ok(opened.created),
        &ConversationReply {
            view: AgentView {
                conversation: &opened.conversation,
                participants: &opened.participants,
            },
            created: opened.created,
            reopened: opened.reopened,
        },
    )
}

/// Has the room's shard tell its members and the inbox (and learn the participants added, if
/// the room is loaded there).
fn announce(
    shared: &Shared,
    claims: &Claims,
    room: RoomKey,
    conversation: &Conversation,
    added: Vec<String>,
    created: bool,
) {
    let change = if created {
        ChangeKind::Created
    } else {
        ChangeKind::Reopened
    };
    let shard = &shared.shards[shard_of(&room, shared.shards.len())];
    let actor = claims.sub.clone();
    let conversation = conversation.clone();
    let work = ShardCommand::Run(Box::new(move |shard| {
        shard.add_participants(&room, &added);
        shard.conversation_event(&room, &conversation, (change, &actor), None, true);
    }));
    // The answer does not wait for the events; a full shard queue drops them (logged).
    if shard.commands.try_send(work).is_err() {
        tracing::warn!("a conversation event was dropped: the room's shard is overloaded");
    }
}
