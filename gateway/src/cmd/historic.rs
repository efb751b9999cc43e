//! `historic`: page through a room's stored messages.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use storage::{HistoryPage, HistoryQuery, RoomKey, Store};

use super::{mark_mine, marks_mine, parse_data, Code, RoomCall};
use crate::auth::may_join;
use crate::codec::{ErrorCode, FrameBuilder, ProtocolError};
use crate::delivery::{mark_delivery, page_delivery, side_of, PageDelivery};
use crate::metrics::OutCode;
use crate::outbox::FrameClass;
use crate::shard::{
    access_error, server_busy, storage_unavailable, ConnRef, Route, Shard, ShardEvent, Slot,
};

pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 200;
/// Longest search string, in bytes.
pub const MAX_SEARCH_BYTES: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Historic {
    pub before_seq: Option<u64>,
    pub after_seq: Option<u64>,
    /// Already clamped to `1..=MAX_LIMIT`.
    pub limit: u32,
    pub search: Option<String>,
}

#[derive(Deserialize)]
struct HistoricData {
    before_seq: Option<u64>,
    after_seq: Option<u64>,
    limit: Option<u32>,
    search: Option<String>,
}

impl Historic {
    pub fn parse(data: &RawValue) -> Result<Historic, ProtocolError> {
        let d: HistoricData = parse_data(data)?;
        if d.search
            .as_ref()
            .is_some_and(|s| s.len() > MAX_SEARCH_BYTES)
        {
            return Err(ProtocolError::bad_request(
                "search is longer than 256 bytes",
            ));
        }
        Ok(Historic {
            before_seq: d.before_seq,
            after_seq: d.after_seq,
            limit: d.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT),
            search: d.search.filter(|s| !s.trim().is_empty()),
        })
    }
}

impl Shard {
    /// `historic`: a page of the room's history (or of a search in it), read and serialized
    /// in helper tasks, cut to the reply budget.
    pub(crate) fn historic(&mut self, call: RoomCall, historic: Historic) {
        let RoomCall {
            conn,
            room: room_id,
            reference,
            ..
        } = call;
        let Some(Slot::Ready(state)) = self.rooms.get(&room_id) else {
            return;
        };
        if let Some(error) = access_error(may_join(&conn.claims, &state.room)) {
            self.reply_error(&conn, Code::Historic, &room_id, reference.as_deref(), error);
            self.maybe_unload(&room_id);
            return;
        }
        let Some(permit) = self.try_work() else {
            let error = server_busy();
            self.reply_error(&conn, Code::Historic, &room_id, reference.as_deref(), error);
            return self.maybe_unload(&room_id);
        };
        let store = self.shared.store.clone();
        let (shared, here) = (self.shared.clone(), self.index);
        let metrics = self.shared.metrics.clone();
        let budget = self.shared.config.max_reply_bytes;
        // A conversation's messages carry their delivery state; the reader's side has them
        // (the whole span of a page, not of a search's scattered hits).
        let marks = self.delivery_marks(&room_id);
        let reader = side_of(conn.claims.role).filter(|_| historic.search.is_none());
        let events = self.events_tx.clone();
        // Paging forward keeps the oldest messages of a page cut to the budget, paging back
        // the newest, so the next page continues where this one stops.
        let keep = if historic.after_seq.is_some() {
            PageEnd::Oldest
        } else {
            PageEnd::Newest
        };
        let query = HistoryQuery {
            before_seq: historic.before_seq,
            after_seq: historic.after_seq,
            limit: historic.limit,
            include_notes: conn.claims.role.sees_notes(),
            max_bytes: budget,
        };
        let search = historic.search.map(|words| query.search(&words));
        self.maybe_unload(&room_id);
        tokio::spawn(async move {
            let unavailable = |conn: &ConnRef, room_id: &RoomKey, reference: Option<&str>| {
                metrics.error(ErrorCode::Unavailable);
                FrameBuilder::error(
                    Code::Historic.response(),
                    Some(&conn.claims.sub),
                    Some(&room_id.room_id),
                    reference,
                    &storage_unavailable(),
                )
            };
            let page = match search {
                Some(search) => store.search(&room_id, search).await,
                None => store.history(&room_id, query).await,
            };
            let page = match (page, marks) {
                (Ok(page), Some(live)) => page_delivery(&store, &room_id, live, &page.messages)
                    .await
                    .map(|delivery| (page, Some(delivery.for_reader(reader)))),
                (page, _) => page.map(|page| (page, None)),
            };
            let mut through = None;
            let frame = match page {
                Ok((page, delivery)) => {
                    let (user_id, room) = (conn.claims.sub.clone(), room_id.clone());
                    let role = conn.claims.role;
                    let reference = reference.clone();
                    // A page may be large: it is serialized off the shard's thread.
                    let built = tokio::task::spawn_blocking(move || {
                        let customer = marks_mine(role).then_some(user_id.as_str());
                        let json = page_json(&page, budget, keep, customer, delivery.as_ref());
                        // A page cut to the budget continues where it was cut; otherwise from
                        // where a search stopped at its row budget, if it did.
                        let (next_before_seq, next_after_seq) = match (json.cut_at, keep) {
                            (Some(seq), PageEnd::Newest) => (Some(seq), None),
                            (Some(seq), PageEnd::Oldest) => (None, Some(seq)),
                            (None, _) => (page.next_before_seq, page.next_after_seq),
                        };
                        let frame = FrameBuilder::success(
                            Code::Historic.response(),
                            &user_id,
                            Some(&room.room_id),
                            reference.as_deref(),
                            HistoricReply {
                                messages: &json.messages,
                                has_more: json.has_more,
                                next_before_seq,
                                next_after_seq,
                            },
                        );
                        (frame, delivery.and(json.through))
                    })
                    .await;
                    match built {
                        Ok((frame, delivered)) => {
                            through = delivered;
                            frame
                        }
                        Err(_) => unavailable(&conn, &room_id, None),
                    }
                }
                Err(e) => {
                    tracing::warn!(room_id = %room_id.room_id, error = %e, "reading history failed");
                    unavailable(&conn, &room_id, reference.as_deref())
                }
            };
            metrics.frames_out(OutCode::Response(Code::Historic), 1);
            Route::new(&shared.shards, here).send(&conn, frame, FrameClass::Durable);
            if let (Some(team), Some(seq)) = (reader, through) {
                let delivered =
                    move |shard: &mut Shard| shard.delivered_through(&room_id, team, seq);
                let _ = events.send(ShardEvent::Continue(Box::new(delivered))).await;
            }
            drop(permit);
        });
    }
}

#[derive(Serialize)]
struct HistoricReply<'a> {
    messages: &'a RawValue,
    has_more: bool,
    /// Where the next page starts when this one stopped early: cut to the reply budget, or a
    /// search that used up its row budget (see `docs/protocol.md`).
    #[serde(skip_serializing_if = "Option::is_none")]
    next_before_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after_seq: Option<u64>,
}

/// Which messages a page cut to its byte budget keeps.
#[derive(Clone, Copy)]
pub(crate) enum PageEnd {
    Oldest,
    Newest,
}

/// A page's messages as one JSON array of at most `budget` bytes (at least one message, however
/// big), cut at the end `keep` does not name.
pub(crate) struct PageJson {
    pub messages: Box<RawValue>,
    /// More messages follow the page: the store said so, or the budget cut it.
    pub has_more: bool,
    /// Where the budget cut the page: the `seq` of the last message kept at the cut end.
    pub cut_at: Option<u64>,
    /// The highest `seq` on the page.
    pub through: Option<u64>,
}

pub(crate) fn page_json(
    page: &HistoryPage,
    budget: usize,
    keep: PageEnd,
    customer: Option<&str>,
    delivery: Option<&PageDelivery>,
) -> PageJson {
    let mut encoded: Vec<Vec<u8>> = Vec::with_capacity(page.messages.len());
    let mut total = 2;
    let mut through = None;
    let mut push = |message: &storage::Message| -> bool {
        let mut json = serde_json::to_vec(message).expect("serializing a message cannot fail");
        if let Some(state) = delivery.and_then(|d| d.state_of(message)) {
            mark_delivery(&mut json, state);
        }
        if let Some(customer) = customer {
            mark_mine(&mut json, message.sender == customer);
        }
        if !encoded.is_empty() && total + json.len() + 1 > budget {
            return false;
        }
        total += json.len() + 1;
        encoded.push(json);
        through = through.max(Some(message.seq));
        true
    };
    let fitted = match keep {
        PageEnd::Oldest => page.messages.iter().take_while(|m| push(m)).count(),
        PageEnd::Newest => page.messages.iter().rev().take_while(|m| push(m)).count(),
    };
    if matches!(keep, PageEnd::Newest) {
        encoded.reverse();
    }
    let mut out = Vec::with_capacity(total);
    out.push(b'[');
    for (i, json) in encoded.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(json);
    }
    out.push(b']');
    let array = String::from_utf8(out).expect("serde_json writes utf-8");
    let messages = RawValue::from_string(array).expect("an array of serialized messages is json");
    let cut = fitted < page.messages.len();
    let cut_at = cut.then(|| match keep {
        PageEnd::Oldest => page.messages[fitted - 1].seq,
        PageEnd::Newest => page.messages[page.messages.len() - fitted].seq,
    });
    PageJson {
        messages,
        has_more: page.has_more || cut,
        cut_at,
        through,
    }
}
