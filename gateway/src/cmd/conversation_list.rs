//! `conversation_list`: the team's inbox — the tenant's conversations by last activity, one
//! page at a time, filtered (`OPEN`, `CLOSED`, `SNOOZED`, `UNREAD`, `PRIORITY`,
//! `ASSIGNED_TO_ME`, `ALL`; by inbox and label), each with the caller's unread count. Agents
//! and admins only; no `room_id`.
//!
//! Paging walks the list as it was when the first page was read (the store keeps the places
//! conversations had before they moved: [`storage::records::ListQuery`]), so a walk sees every
//! conversation once, with no duplicate or gap, while new messages keep moving conversations
//! to the top; the moves themselves reach an inbox subscriber live (`conversation_response`).
//! A page examines at most [`SCAN_BUDGET`] conversations; a filter that matches few answers
//! with what it found and a `next` cursor to go on from.

use std::sync::Arc;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use storage::records::{Conversation, ListQuery, LIST_SNAPSHOT_MILLIS};
use storage::{RecordKind, RoomKey, Store, Timestamp};

use super::{parse_data, Code};
use crate::auth::Role;
use crate::codec::{ErrorCode, FrameBuilder, ProtocolError};
use crate::inbox::AgentView;
use crate::metrics::OutCode;
use crate::outbox::FrameClass;
use crate::server::Shared;
use crate::shard::ConnRef;

/// Default and largest page.
pub const DEFAULT_LIMIT: u32 = 25;
pub const MAX_LIMIT: u32 = 100;
/// Most conversations one page examines.
pub const SCAN_BUDGET: usize = 1000;
/// Conversations read from the store at a time while filling a page.
const BATCH: u32 = 100;
/// How long a `next` cursor stays usable (less than the store keeps old places).
const CURSOR_LIFE_MILLIS: i64 = LIST_SNAPSHOT_MILLIS - 30_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Filter {
    Open,
    Closed,
    Snoozed,
    Unread,
    Priority,
    AssignedToMe,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Sort {
    Newest,
    Oldest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationList {
    pub filter: Filter,
    pub sort: Sort,
    pub inbox_id: Option<String>,
    pub label: Option<String>,
    pub limit: u32,
    pub next: Option<Cursor>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Data {
    filter: Option<Filter>,
    sort: Option<Sort>,
    inbox_id: Option<String>,
    label: Option<String>,
    limit: Option<u32>,
    next: Option<String>,
}

/// Where a walk is: its snapshot time, the segment (`PRIORITY` walks pinned conversations,
/// then the other prioritized ones) and the last place examined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// The store's time of the walk (`None` until the first page has read it).
    #[serde(rename = "t")]
    as_of: Option<i64>,
    /// When the walk started (wall clock), for its expiry.
    #[serde(rename = "w")]
    started: i64,
    #[serde(rename = "s")]
    segment: u8,
    #[serde(rename = "k")]
    key: Option<i64>,
    #[serde(rename = "i")]
    id: Option<String>,
}

impl Cursor {
    fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    fn decode(text: &str) -> Option<Cursor> {
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .ok()?;
        serde_json::from_slice(&json).ok()
    }
}

impl ConversationList {
    pub fn parse(data: &RawValue) -> Result<ConversationList, ProtocolError> {
        let d: Data = parse_data(data)?;
        let limit = d.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ProtocolError::bad_request("data.limit must be 1 to 100"));
        }
        let next = match d.next {
            None => None,
            Some(text) => Some(Cursor::decode(&text).ok_or_else(|| {
                ProtocolError::bad_request("data.next is not a cursor this server gave")
            })?),
        };
        Ok(ConversationList {
            filter: d.filter.unwrap_or(Filter::Open),
            sort: d.sort.unwrap_or(Sort::Newest),
            inbox_id: d.inbox_id,
            label: d.label,
            limit,
            next,
        })
    }

    /// How many segments the filter walks.
    fn segments(&self) -> u8 {
        if self.filter == Filter::Priority {
            2
        } else {
            1
        }
    }

    /// Whether `c` belongs on the list (all but the unread count, which needs a read).
    fn keeps(&self, c: &Conversation, segment: u8, user: &str, now: Timestamp) -> bool {
        let snoozed = c.snoozed_until.is_some_and(|until| until > now);
        let by_state = match self.filter {
            Filter::Open => c.is_open && !snoozed && !c.archived,
            Filter::Closed => !c.is_open,
            Filter::Snoozed => c.is_open && snoozed,
            Filter::Unread => c.is_open,
            Filter::Priority => {
                c.is_open
                    && if segment == 0 {
                        c.show_on_top
                    } else {
                        !c.show_on_top && c.priority.is_some()
                    }
            }
            Filter::AssignedToMe => c.is_open && c.assignee.as_deref() == Some(user),
            Filter::All => true,
        };
        by_state
            && self
                .inbox_id
                .as_ref()
                .is_none_or(|inbox| c.inbox_id.as_ref() == Some(inbox))
            && self
                .label
                .as_ref()
                .is_none_or(|label| c.labels.contains(label))
    }

    /// Runs on the connection's task; the reply goes to its outbox.
    pub(crate) fn spawn(self, shared: Arc<Shared>, conn: ConnRef, reference: Option<String>) {
        if !conn.claims.role.sees_notes() {
            let error = ProtocolError::new(
                ErrorCode::Forbidden,
                "only agents and admins list the inbox",
            );
            return reply(&shared, &conn, reference.as_deref(), Err(error));
        }
        let Ok(permit) = shared.presence_tasks.clone().try_acquire_owned() else {
            let error = ProtocolError::new(ErrorCode::Unavailable, "server busy, retry later");
            return reply(&shared, &conn, reference.as_deref(), Err(error));
        };
        tokio::spawn(async move {
            let page = self.page(&shared, &conn).await;
            reply(&shared, &conn, reference.as_deref(), page);
            drop(permit);
        });
    }

    async fn page(&self, shared: &Shared, conn: &ConnRef) -> Result<Page, ProtocolError> {
        let now = Timestamp::now();
        let mut cursor = match &self.next {
            Some(cursor) if cursor.started < now.0 - CURSOR_LIFE_MILLIS => {
                return Err(ProtocolError::bad_request(
                    "data.next has expired: start the list again",
                ))
            }
            Some(cursor) => cursor.clone(),
            // The store picks the walk's time on the first read: every change committed by
            // then is on the walk, and none committed later.
            None => Cursor {
                as_of: None,
                started: now.0,
                segment: 0,
                key: None,
                id: None,
            },
        };
        let store = &shared.store;
        let (tenant, user) = (&conn.claims.tenant, &conn.claims.sub);
        let mut items = Vec::new();
        let mut examined = 0;
        let mut more = true;
        'walk: while (items.len() as u32) < self.limit && examined < SCAN_BUDGET {
            let query = ListQuery {
                as_of: cursor.as_of.map(Timestamp),
                descending: self.sort == Sort::Newest,
                after: cursor.key.zip(cursor.id.clone()),
                limit: BATCH,
            };
            let page = store
                .list_records(tenant, RecordKind::Conversation, query)
                .await
                .map_err(|_| unavailable())?;
            cursor.as_of = Some(page.as_of.0);
            let exhausted = page.entries.len() < BATCH as usize;
            for entry in page.entries {
                examined += 1;
                cursor.key = Some(entry.list_key);
                cursor.id = Some(entry.record.key.id.clone());
                // A body this build cannot read is skipped rather than failing the page.
                let Ok(conversation) = serde_json::from_str::<Conversation>(&entry.record.body)
                else {
                    continue;
                };
                if self.keeps(&conversation, cursor.segment, user, now) {
                    let room = RoomKey::new(tenant, &conversation.room_id);
                    let unread = store
                        .read_state(&room, user)
                        .await
                        .map_err(|_| unavailable())?
                        .unread_for(true);
                    if self.filter != Filter::Unread || unread > 0 {
                        let participants = store
                            .room(&room)
                            .await
                            .map_err(|_| unavailable())?
                            .map(|r| r.participants)
                            .unwrap_or_default();
                        items.push((conversation, participants, unread));
                    }
                }
                if items.len() as u32 == self.limit || examined == SCAN_BUDGET {
                    break 'walk;
                }
            }
            if exhausted {
                if cursor.segment + 1 < self.segments() {
                    cursor.segment += 1;
                    cursor.key = None;
                    cursor.id = None;
                } else {
                    more = false;
                    break;
                }
            }
        }
        Ok(Page {
            items,
            next: more.then(|| cursor.encode()),
            is_admin: conn.claims.role == Role::Admin,
            user: user.clone(),
        })
    }
}

fn unavailable() -> ProtocolError {
    ProtocolError::new(ErrorCode::Unavailable, "storage unavailable, retry later")
}

struct Page {
    items: Vec<(Conversation, Vec<String>, u64)>,
    next: Option<String>,
    is_admin: bool,
    user: String,
}

#[derive(Serialize)]
struct Item<'a> {
    #[serde(flatten)]
    view: AgentView<'a>,
    unread_count: u64,
    /// The caller may manage it as its owner: an admin, or the agent it is assigned to.
    is_admin: bool,
}

#[derive(Serialize)]
struct Reply<'a> {
    conversations: Vec<Item<'a>>,
    /// More may follow: pass this as `data.next`. `null` at the end of the list.
    next: Option<&'a str>,
    has_more: bool,
}

fn reply(
    shared: &Shared,
    conn: &ConnRef,
    reference: Option<&str>,
    page: Result<Page, ProtocolError>,
) {
    let code = Code::ConversationList.response();
    let frame = match &page {
        Ok(page) => FrameBuilder::success(
            code,
            &conn.claims.sub,
            None,
            reference,
            Reply {
                conversations: page
                    .items
                    .iter()
                    .map(|(conversation, participants, unread)| Item {
                        view: AgentView {
                            conversation,
                            participants,
                        },
                        unread_count: *unread,
                        is_admin: page.is_admin
                            || conversation.assignee.as_deref() == Some(page.user.as_str()),
                    })
                    .collect(),
                next: page.next.as_deref(),
                has_more: page.next.is_some(),
            },
        ),
        Err(error) => {
            shared.metrics.error(error.code);
            FrameBuilder::error(code, Some(&conn.claims.sub), None, reference, error)
        }
    };
    shared
        .metrics
        .frames_out(OutCode::Response(Code::ConversationList), 1);
    conn.outbox.push(frame, FrameClass::Durable);
}
