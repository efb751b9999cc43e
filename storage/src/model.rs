//! The stored records. `Message` serializes exactly as PROTOCOL.md §4 shows it on the wire.

use serde::{Deserialize, Serialize, Serializer};

/// Milliseconds since the Unix epoch; serialized as RFC 3339 UTC with milliseconds
/// (`2023-05-01T12:34:56.789Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(since_epoch.as_millis() as i64)
    }

    /// Writes the RFC 3339 form into `out` without allocating.
    pub fn write_rfc3339(self, out: &mut String) {
        let dt = self.date_time();
        match Self::rfc3339_bytes(dt) {
            // The bytes are ASCII digits and separators.
            Some(bytes) => out.push_str(std::str::from_utf8(&bytes).unwrap_or_default()),
            None => Self::write_formatted(dt, out),
        }
    }

    /// The RFC 3339 form by the formatter, for any year.
    fn write_formatted(dt: time::OffsetDateTime, out: &mut String) {
        use std::fmt::Write;
        let _ = write!(
            out,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            dt.year(),
            u8::from(dt.month()),
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second(),
            dt.millisecond()
        );
    }

    fn date_time(self) -> time::OffsetDateTime {
        let nanos = i128::from(self.0) * 1_000_000;
        time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    }

    /// `YYYY-MM-DDThh:mm:ss.mmmZ` written digit by digit (it is in every frame), for the
    /// four-digit years; `None` for the others, which take the formatter.
    fn rfc3339_bytes(dt: time::OffsetDateTime) -> Option<[u8; 24]> {
        let year = u16::try_from(dt.year()).ok().filter(|year| *year <= 9999)?;
        let mut out = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, width: usize, mut value: u16| {
            for slot in out[at..at + width].iter_mut().rev() {
                *slot = b'0' + (value % 10) as u8;
                value /= 10;
            }
        };
        put(0, 4, year);
        put(5, 2, u16::from(u8::from(dt.month())));
        put(8, 2, u16::from(dt.day()));
        put(11, 2, u16::from(dt.hour()));
        put(14, 2, u16::from(dt.minute()));
        put(17, 2, u16::from(dt.second()));
        put(20, 3, dt.millisecond());
        Some(out)
    }

    /// The RFC 3339 form.
    pub fn to_rfc3339(self) -> String {
        let mut out = String::with_capacity(24);
        self.write_rfc3339(&mut out);
        out
    }

    /// Parses an RFC 3339 time (any offset; kept to the millisecond).
    pub fn parse_rfc3339(text: &str) -> Option<Timestamp> {
        let dt = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            .ok()?;
        i64::try_from(dt.unix_timestamp_nanos() / 1_000_000)
            .ok()
            .map(Timestamp)
    }

    /// This time plus `millis` (saturating).
    pub fn plus_millis(self, millis: i64) -> Timestamp {
        Timestamp(self.0.saturating_add(millis))
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Timestamp::parse_rfc3339(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("{text:?} is not an RFC 3339 time")))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match Self::rfc3339_bytes(self.date_time()) {
            // The bytes are ASCII digits and separators.
            Some(bytes) => {
                serializer.serialize_str(std::str::from_utf8(&bytes).unwrap_or_default())
            }
            None => serializer.serialize_str(&self.to_rfc3339()),
        }
    }
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for Timestamp {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
            .description(Some("RFC 3339 UTC with milliseconds"))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for Timestamp {}

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $(
                #[doc = concat!("`", $text, "`")]
                #[serde(rename = $text)]
                $variant,
            )+
        }

        impl $name {
            /// The wire and storage spelling.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text,)+ }
            }

            /// Parses the wire and storage spelling.
            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        // By hand: the derive does not see the wire spellings through this macro.
        #[cfg(feature = "openapi")]
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                use utoipa::openapi::schema::{ObjectBuilder, Type};
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some([$($text),+]))
                    .into()
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::ToSchema for $name {
            fn name() -> std::borrow::Cow<'static, str> {
                std::borrow::Cow::Borrowed(stringify!($name))
            }
        }
    };
}

string_enum!(
    /// Who sent a message.
    SenderType { User => "user", Agent => "agent", Customer => "customer", Contact => "contact", Ai => "ai", System => "system" }
);

string_enum!(
    /// Which way a message travels (PROTOCOL.md §4).
    Direction { Incoming => "INCOMING", Outgoing => "OUTGOING", Note => "NOTE", Internal => "INTERNAL" }
);

string_enum!(
    /// The content type of a message.
    MessageType {
        Text => "text", Markdown => "markdown", Image => "image", Audio => "audio", Video => "video",
        File => "file", Location => "location", Carousel => "carousel", Card => "card",
        Dropdown => "dropdown", Choice => "choice",
    }
);

string_enum!(
    /// What a room is for.
    RoomKind { Team => "team", Support => "support", Prospect => "prospect" }
);

/// Names one room: ids are unique within a tenant only, so every room record is keyed by the
/// pair. Another tenant's room with the same id is a different room.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomKey {
    pub tenant_id: String,
    pub room_id: String,
}

impl RoomKey {
    /// The key of room `room_id` of tenant `tenant_id`.
    pub fn new(tenant_id: &str, room_id: &str) -> Self {
        RoomKey {
            tenant_id: tenant_id.to_owned(),
            room_id: room_id.to_owned(),
        }
    }
}

/// A stored message, as PROTOCOL.md §4 shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Message {
    pub message_id: String,
    pub seq: u64,
    pub room_id: String,
    pub sender: String,
    pub sender_type: SenderType,
    pub direction: Direction,
    #[serde(rename = "type")]
    pub kind: MessageType,
    pub message: String,
    pub attached_files: Vec<String>,
    pub reply_to: Option<String>,
    pub mentions: Vec<String>,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub created_at: Timestamp,
}

/// A message to store at the `seq` its room's owner chose.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub message_id: String,
    /// The room's next seq as its owner counts (see [`crate::Store::append`]).
    pub seq: u64,
    /// The tenant owning the room (part of the room's key, not of the stored [`Message`]).
    pub tenant_id: String,
    pub room_id: String,
    pub sender: String,
    pub sender_type: SenderType,
    pub direction: Direction,
    pub kind: MessageType,
    pub message: String,
    pub attached_files: Vec<String>,
    pub reply_to: Option<String>,
    pub mentions: Vec<String>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub created_at: Timestamp,
}

impl NewMessage {
    /// A plain text message from a team member in a team room, with a fresh ULID as its id,
    /// to be stored at `seq`.
    pub fn text(room: &RoomKey, seq: u64, sender: &str, message: &str) -> Self {
        NewMessage {
            message_id: ulid::Ulid::new().to_string(),
            seq,
            tenant_id: room.tenant_id.clone(),
            room_id: room.room_id.clone(),
            sender: sender.to_owned(),
            sender_type: SenderType::User,
            direction: Direction::Internal,
            kind: MessageType::Text,
            message: message.to_owned(),
            attached_files: Vec::new(),
            reply_to: None,
            mentions: Vec::new(),
            metadata: serde_json::Map::new(),
            created_at: Timestamp::now(),
        }
    }

    /// The key of the room this message goes to.
    pub fn room_key(&self) -> RoomKey {
        RoomKey::new(&self.tenant_id, &self.room_id)
    }

    /// The stored form.
    pub fn into_message(self) -> Message {
        Message {
            message_id: self.message_id,
            seq: self.seq,
            room_id: self.room_id,
            sender: self.sender,
            sender_type: self.sender_type,
            direction: self.direction,
            kind: self.kind,
            message: self.message,
            attached_files: self.attached_files,
            reply_to: self.reply_to,
            mentions: self.mentions,
            metadata: self.metadata,
            created_at: self.created_at,
        }
    }
}

/// The outcome of [`crate::Store::append`].
#[derive(Debug, Clone, PartialEq)]
pub struct Appended {
    /// The stored message (the original one when `duplicate`).
    pub message: Message,
    /// True when the `message_id` was already stored and nothing new was written.
    pub duplicate: bool,
}

/// A room (a team room or a conversation).
#[derive(Debug, Clone, PartialEq)]
pub struct Room {
    pub room_id: String,
    pub tenant_id: String,
    pub kind: RoomKind,
    pub title: String,
    pub status: String,
    pub participants: Vec<String>,
    pub created_at: Timestamp,
    /// Highest stored `seq` (0 for an empty room).
    pub last_seq: u64,
}

impl Room {
    /// The key this room is stored under.
    pub fn key(&self) -> RoomKey {
        RoomKey::new(&self.tenant_id, &self.room_id)
    }
}

/// A room to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRoom {
    pub room_id: String,
    pub tenant_id: String,
    pub kind: RoomKind,
    pub title: String,
    pub status: String,
    pub participants: Vec<String>,
    pub created_at: Timestamp,
}

impl NewRoom {
    /// A team room with one first participant, titled after its id.
    pub fn team(room_id: &str, tenant_id: &str, first_participant: &str) -> Self {
        NewRoom {
            room_id: room_id.to_owned(),
            tenant_id: tenant_id.to_owned(),
            kind: RoomKind::Team,
            title: room_id.to_owned(),
            status: "active".to_owned(),
            participants: vec![first_participant.to_owned()],
            created_at: Timestamp::now(),
        }
    }

    /// The key this room will be stored under.
    pub fn key(&self) -> RoomKey {
        RoomKey::new(&self.tenant_id, &self.room_id)
    }
}

/// Which messages of a room to read. Results are always oldest first.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HistoryQuery {
    /// Only messages with `seq < before_seq`.
    pub before_seq: Option<u64>,
    /// Only messages with `seq > after_seq`.
    pub after_seq: Option<u64>,
    /// At most this many messages (the caller enforces its own caps; 0 means 50).
    pub limit: u32,
    /// Whether `NOTE` messages are visible to the reader.
    pub include_notes: bool,
    /// Stop once the page holds about this many bytes of message data (0: no budget). The
    /// page then keeps at least one message, says `has_more`, and stops at the end it reads
    /// from (the newest messages when paging backwards, the oldest when paging forwards), so a
    /// read never holds more than the budget plus one message, however large `limit` is.
    pub max_bytes: usize,
}

/// Which messages of a room to find by their words ([`crate::Store::search`]). Results are
/// oldest first and page like [`HistoryQuery`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SearchQuery {
    /// Every one of these words must occur in the message text, case-insensitively, as a whole
    /// word.
    pub words: String,
    /// Only messages with `seq < before_seq`.
    pub before_seq: Option<u64>,
    /// Only messages with `seq > after_seq`.
    pub after_seq: Option<u64>,
    /// At most this many messages (0 means 50).
    pub limit: u32,
    /// Whether `NOTE` messages are visible to the reader.
    pub include_notes: bool,
    /// As [`HistoryQuery::max_bytes`].
    pub max_bytes: usize,
}

impl HistoryQuery {
    /// The same window and visibility, as a search for `words`.
    pub fn search(&self, words: &str) -> SearchQuery {
        SearchQuery {
            words: words.to_owned(),
            before_seq: self.before_seq,
            after_seq: self.after_seq,
            limit: self.limit,
            include_notes: self.include_notes,
            max_bytes: self.max_bytes,
        }
    }
}

/// A user's read marker in a room and what is left unread after it, from maintained counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadState {
    /// The seq of the last message the user has read (0: none).
    pub read_seq: u64,
    /// Messages after the marker that someone else sent, notes included (a team member's count).
    pub unread_with_notes: u64,
    /// The same without notes (a customer's count: notes are never shown to them).
    pub unread: u64,
}

impl ReadState {
    /// The count a reader sees: with notes when they may see notes.
    pub fn unread_for(&self, include_notes: bool) -> u64 {
        if include_notes {
            self.unread_with_notes
        } else {
            self.unread
        }
    }
}

/// One page of history.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HistoryPage {
    /// Oldest first.
    pub messages: Vec<Message>,
    /// Whether more messages match in the paging direction: older ones when paging backwards
    /// (no cursor or `before_seq` only), newer ones when paging forwards (`after_seq`). A
    /// search that used up its row budget says `true` and sets one of the cursors below.
    pub has_more: bool,
    /// Set when a search (or a read that skips notes) stopped at its row budget while paging backwards: the `before_seq` of
    /// the next request (rows below it were not examined yet). Not set otherwise; paging then
    /// continues from the oldest returned message as usual.
    pub next_before_seq: Option<u64>,
    /// The same when paging forwards: the `after_seq` of the next request.
    pub next_after_seq: Option<u64>,
    /// Rows of the room this request read, or for a search by index the index hits it
    /// examined (a search stops at its budget).
    pub examined: u64,
}

/// What one read of a room found, in the order it read (newest first when paging backwards),
/// and why it stopped; [`ScanOutcome::into_page`] turns it into the page the caller gets. Both
/// backends page the same way through it.
#[derive(Debug, Default)]
pub(crate) struct ScanOutcome {
    /// The messages kept, up to `limit + 1` (one more tells that more follow).
    pub(crate) messages: Vec<Message>,
    pub(crate) limit: usize,
    /// Reading forwards (from `after_seq`) rather than backwards.
    pub(crate) forwards: bool,
    /// A search or a read that hides notes: not every row read was kept.
    pub(crate) filtered: bool,
    /// The byte budget cut the page with messages left.
    pub(crate) cut: bool,
    /// The row or time budget ran out with rows left unexamined.
    pub(crate) budget_spent: bool,
    pub(crate) examined: u64,
    /// The seq of the last row read.
    pub(crate) last_examined: Option<u64>,
}

impl ScanOutcome {
    /// The page: oldest first, `has_more`, and where a filtered read goes on from.
    #[cfg_attr(not(any(feature = "sqlite", feature = "scylla")), allow(dead_code))]
    pub(crate) fn into_page(self) -> HistoryPage {
        let ScanOutcome {
            mut messages,
            limit,
            forwards,
            filtered,
            cut,
            budget_spent,
            examined,
            last_examined,
        } = self;
        let more_kept = messages.len() > limit || cut;
        let continue_from = if !more_kept && budget_spent {
            // Rows remain unexamined: the caller continues from the last row this request read.
            last_examined
        } else if cut && filtered {
            // A filtered read continues after the last row it read, the last message kept.
            messages.last().map(|m| m.seq)
        } else {
            None
        };
        let mut page = HistoryPage {
            has_more: more_kept || budget_spent,
            examined,
            ..HistoryPage::default()
        };
        if forwards {
            page.next_after_seq = continue_from;
        } else {
            page.next_before_seq = continue_from;
        }
        messages.truncate(limit);
        if !forwards {
            messages.reverse();
        }
        page.messages = messages;
        page
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The formatter's spelling, which the digit-by-digit one must match.
    fn formatted(stamp: Timestamp) -> String {
        let mut out = String::new();
        Timestamp::write_formatted(stamp.date_time(), &mut out);
        out
    }

    #[test]
    fn rfc3339_is_spelled_as_the_formatter_spells_it() {
        // 10000-01-01T00:00:00.000Z, past the years `time` represents (it reads as the epoch).
        let year_10000 = 253_402_300_800_000;
        let mut stamps = vec![
            0,
            1,
            999,
            -1,
            -62_135_596_800_000,
            year_10000 - 1,
            year_10000,
        ];
        // Leap days, month ends and every millisecond digit across three centuries.
        let mut millis = -2_208_988_800_000i64; // 1900-01-01
        while millis < 4_102_444_800_000 {
            stamps.push(millis);
            millis += 86_399_999 * 7 + 123;
        }
        for millis in stamps {
            let stamp = Timestamp(millis);
            let expected = formatted(stamp);
            assert_eq!(stamp.to_rfc3339(), expected, "{millis}");
            assert_eq!(
                serde_json::to_string(&stamp).unwrap(),
                format!("\"{expected}\""),
                "{millis}"
            );
        }
        assert_eq!(
            Timestamp(1_682_944_496_789).to_rfc3339(),
            "2023-05-01T12:34:56.789Z"
        );
    }
}
