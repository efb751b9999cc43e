//! What a message (`chat`, `note`) may carry, by its `type`: text, attachments and the
//! structured payload of the rich types, each checked with an error naming the field.
//!
//! - `text`, `markdown`: `message`, or at least one attachment.
//! - `image`, `audio`, `video`, `file`: at least one attachment; a described attachment's
//!   `content_type` must be of the type's kind (`image/…` for `image`).
//! - `location`, `card`, `carousel`, `dropdown`, `choice`: `metadata.payload` in the type's
//!   shape (see [`Payload`]); `message` is the text a client without the type shows.
//!
//! An attachment is a reference in `attached_files` (a file id or URL string, as PROTOCOL.md
//! states it: an id names a file uploaded with `POST /api/v1/files` and must exist, see
//! [`crate::http::files::check_attachments`]), or a described file in `metadata.attachments`
//! (`{"url", "content_type", "name"?, "size"?}`): structured content lives in `metadata`, so
//! the message keeps the contract's shape.

use serde::Deserialize;
use serde_json::{Map, Value};
use storage::MessageType;

use super::parse_data;
use crate::codec::{ErrorCode, ProtocolError};

/// Most attachments per message (references and described files together), and the longest
/// reference or URL.
pub const MAX_ATTACHMENTS: usize = 32;
pub const MAX_ATTACHMENT_BYTES: usize = 2048;
/// Longest `name` and `content_type` of a described attachment.
const MAX_NAME_BYTES: usize = 255;
/// Most cards in a carousel, buttons on a card, options of a dropdown or choice.
const MAX_CARDS: usize = 10;
const MAX_BUTTONS: usize = 10;
const MAX_OPTIONS: usize = 50;
const MAX_TITLE_BYTES: usize = 256;
const MAX_VALUE_BYTES: usize = 1024;

/// Whether an `attached_files` reference names an uploaded file (anything but an `http(s)`
/// URL).
pub fn is_file_id(reference: &str) -> bool {
    let lower = reference.get(..8).unwrap_or(reference).to_ascii_lowercase();
    !(lower.starts_with("http://") || lower.starts_with("https://"))
}

/// Checks `type`, `message`, `attached_files`, `metadata.attachments` and `metadata.payload`
/// together; returns the message type.
pub fn check(
    kind: Option<&str>,
    message: &str,
    attached_files: &[String],
    metadata: &Map<String, Value>,
) -> Result<MessageType, ProtocolError> {
    let kind = match kind {
        None => MessageType::Text,
        Some(k) => MessageType::parse(k).ok_or_else(|| {
            ProtocolError::bad_request(format!(
                "data.type: unknown message type {k:?}; one of text, markdown, image, audio, \
                 video, file, location, carousel, card, dropdown, choice"
            ))
        })?,
    };
    for (i, reference) in attached_files.iter().enumerate() {
        if reference.is_empty() {
            return Err(ProtocolError::bad_request(format!(
                "data.attached_files[{i}] is empty"
            )));
        }
        if reference.len() > MAX_ATTACHMENT_BYTES {
            return Err(ProtocolError::new(
                ErrorCode::TooLarge,
                format!("data.attached_files[{i}] is longer than 2048 bytes"),
            ));
        }
    }
    let described: Vec<File> = match metadata.get("attachments") {
        None => Vec::new(),
        Some(files) => at_path("metadata.attachments", files)?,
    };
    if attached_files.len() + described.len() > MAX_ATTACHMENTS {
        return Err(ProtocolError::new(
            ErrorCode::TooLarge,
            "data: at most 32 attachments (attached_files and metadata.attachments together)",
        ));
    }
    for (i, file) in described.iter().enumerate() {
        file.check(i)?;
    }
    let attachments = attached_files.len() + described.len();
    let payload = metadata.get("payload");
    match kind {
        MessageType::Text | MessageType::Markdown => {
            if message.is_empty() && attachments == 0 {
                return Err(ProtocolError::bad_request(
                    "message may be empty only when attached_files is not",
                ));
            }
        }
        MessageType::Image | MessageType::Audio | MessageType::Video | MessageType::File => {
            if attachments == 0 {
                return Err(ProtocolError::bad_request(format!(
                    "data.attached_files: {} message needs at least one attachment",
                    a(kind)
                )));
            }
            let prefix = match kind {
                MessageType::Image => "image/",
                MessageType::Audio => "audio/",
                MessageType::Video => "video/",
                _ => "",
            };
            for (i, file) in described.iter().enumerate() {
                if !file.content_type.starts_with(prefix) {
                    return Err(ProtocolError::bad_request(format!(
                        "data.metadata.attachments[{i}].content_type must be {prefix}* in {} \
                         message, not {:?}",
                        a(kind),
                        file.content_type
                    )));
                }
            }
        }
        MessageType::Location
        | MessageType::Card
        | MessageType::Carousel
        | MessageType::Dropdown
        | MessageType::Choice => {
            let Some(payload) = payload else {
                return Err(ProtocolError::bad_request(format!(
                    "data.metadata.payload is required in {} message",
                    a(kind)
                )));
            };
            Payload::check(kind, payload)?;
            return Ok(kind);
        }
    }
    if payload.is_some() {
        return Err(ProtocolError::bad_request(
            "data.metadata.payload belongs to location, card, carousel, dropdown and choice \
             messages only",
        ));
    }
    Ok(kind)
}

/// The type with its article: "an image", "a card".
fn a(kind: MessageType) -> String {
    let name = kind.as_str();
    let article = if name.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {name}")
}

/// A described attachment (`metadata.attachments[i]`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    url: String,
    content_type: String,
    #[serde(default)]
    name: Option<String>,
    #[allow(dead_code)] // Checked for its type (a byte count) by deserializing.
    #[serde(default)]
    size: Option<u64>,
}

impl File {
    fn check(&self, i: usize) -> Result<(), ProtocolError> {
        let field = |name: &str| format!("metadata.attachments[{i}].{name}");
        url(&field("url"), &self.url)?;
        if !is_mime_type(&self.content_type) {
            return Err(ProtocolError::bad_request(format!(
                "data.{} must be a MIME type such as image/png",
                field("content_type")
            )));
        }
        if let Some(name) = &self.name {
            bounded(&field("name"), name, MAX_NAME_BYTES)?;
        }
        Ok(())
    }
}

/// `type/subtype`, each a token of letters, digits and `!#$&^_.+-`.
fn is_mime_type(text: &str) -> bool {
    let token = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    text.len() <= MAX_NAME_BYTES
        && text
            .split_once('/')
            .is_some_and(|(kind, sub)| token(kind) && token(sub))
}

/// Deserializes `value` found at `data.<path>`; an error names the exact field.
fn at_path<T: serde::de::DeserializeOwned>(path: &str, value: &Value) -> Result<T, ProtocolError> {
    let raw = serde_json::value::to_raw_value(value)
        .map_err(|e| ProtocolError::bad_request(format!("invalid data.{path}: {e}")))?;
    parse_data::<T>(&raw).map_err(|e| {
        // parse_data names paths from `data.`: put the field's own path in front.
        let message = if let Some(rest) = e.message.strip_prefix("invalid data.[") {
            format!("invalid data.{path}[{rest}")
        } else if let Some(rest) = e.message.strip_prefix("invalid data.") {
            format!("invalid data.{path}.{rest}")
        } else if let Some(rest) = e.message.strip_prefix("invalid data:") {
            format!("invalid data.{path}:{rest}")
        } else {
            e.message
        };
        ProtocolError::bad_request(message)
    })
}

/// The structured payloads of the rich types (`metadata.payload`).
pub enum Payload {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Location {
    latitude: f64,
    longitude: f64,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    address: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Button {
    title: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    url: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Card {
    title: String,
    #[serde(default)]
    subtitle: Option<String>,
    #[serde(default)]
    image_url: Option<String>,
    #[serde(default)]
    buttons: Vec<Button>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Carousel {
    cards: Vec<Card>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Choice {
    title: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    options: Vec<Choice>,
    /// `choice` only: whether several may be picked.
    #[serde(default)]
    multiple: Option<bool>,
}

fn bounded(path: &str, text: &str, max: usize) -> Result<(), ProtocolError> {
    if text.is_empty() || text.len() > max {
        return Err(ProtocolError::bad_request(format!(
            "data.{path} must be 1 to {max} bytes"
        )));
    }
    Ok(())
}

fn url(path: &str, text: &str) -> Result<(), ProtocolError> {
    if !(text.starts_with("https://") || text.starts_with("http://"))
        || text.len() > MAX_ATTACHMENT_BYTES
    {
        return Err(ProtocolError::bad_request(format!(
            "data.{path} must be an http(s) URL of at most 2048 bytes"
        )));
    }
    Ok(())
}

fn check_card(path: &str, card: &Card) -> Result<(), ProtocolError> {
    bounded(&format!("{path}.title"), &card.title, MAX_TITLE_BYTES)?;
    if let Some(subtitle) = &card.subtitle {
        bounded(&format!("{path}.subtitle"), subtitle, MAX_VALUE_BYTES)?;
    }
    if let Some(image) = &card.image_url {
        url(&format!("{path}.image_url"), image)?;
    }
    if card.buttons.len() > MAX_BUTTONS {
        return Err(ProtocolError::bad_request(format!(
            "data.{path}.buttons: at most {MAX_BUTTONS} buttons"
        )));
    }
    for (i, button) in card.buttons.iter().enumerate() {
        let at = format!("{path}.buttons[{i}]");
        bounded(&format!("{at}.title"), &button.title, MAX_TITLE_BYTES)?;
        match (&button.value, &button.url) {
            (Some(value), None) => bounded(&format!("{at}.value"), value, MAX_VALUE_BYTES)?,
            (None, Some(link)) => url(&format!("{at}.url"), link)?,
            _ => {
                return Err(ProtocolError::bad_request(format!(
                    "data.{at} needs either a value (sent back when picked) or a url"
                )))
            }
        }
    }
    Ok(())
}

impl Payload {
    /// Checks a rich type's payload.
    pub fn check(kind: MessageType, payload: &Value) -> Result<(), ProtocolError> {
        const AT: &str = "metadata.payload";
        match kind {
            MessageType::Location => {
                let l: Location = at_path(AT, payload)?;
                if !(-90.0..=90.0).contains(&l.latitude) {
                    return Err(ProtocolError::bad_request(
                        "data.metadata.payload.latitude must be within -90 and 90",
                    ));
                }
                if !(-180.0..=180.0).contains(&l.longitude) {
                    return Err(ProtocolError::bad_request(
                        "data.metadata.payload.longitude must be within -180 and 180",
                    ));
                }
                for (field, text) in [("name", &l.name), ("address", &l.address)] {
                    if let Some(text) = text {
                        bounded(&format!("{AT}.{field}"), text, MAX_VALUE_BYTES)?;
                    }
                }
            }
            MessageType::Card => check_card(AT, &at_path(AT, payload)?)?,
            MessageType::Carousel => {
                let c: Carousel = at_path(AT, payload)?;
                if c.cards.is_empty() || c.cards.len() > MAX_CARDS {
                    return Err(ProtocolError::bad_request(format!(
                        "data.{AT}.cards: 1 to {MAX_CARDS} cards"
                    )));
                }
                for (i, card) in c.cards.iter().enumerate() {
                    check_card(&format!("{AT}.cards[{i}]"), card)?;
                }
            }
            MessageType::Dropdown | MessageType::Choice => {
                let o: Options = at_path(AT, payload)?;
                if o.multiple.is_some() && kind == MessageType::Dropdown {
                    return Err(ProtocolError::bad_request(format!(
                        "data.{AT}.multiple belongs to choice messages only"
                    )));
                }
                if o.options.is_empty() || o.options.len() > MAX_OPTIONS {
                    return Err(ProtocolError::bad_request(format!(
                        "data.{AT}.options: 1 to {MAX_OPTIONS} options"
                    )));
                }
                for (i, option) in o.options.iter().enumerate() {
                    let at = format!("{AT}.options[{i}]");
                    bounded(&format!("{at}.title"), &option.title, MAX_TITLE_BYTES)?;
                    bounded(&format!("{at}.value"), &option.value, MAX_VALUE_BYTES)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn checked(
        kind: &str,
        message: &str,
        files: Value,
        metadata: Value,
    ) -> Result<MessageType, String> {
        let files: Vec<String> = serde_json::from_value(files).unwrap();
        let metadata = metadata.as_object().cloned().unwrap_or_default();
        check(Some(kind), message, &files, &metadata).map_err(|e| e.message)
    }

    #[test]
    fn media_messages_need_attachments_of_their_kind() {
        let png = json!({"attachments": [{"url": "https://cdn.example/a.png", "content_type": "image/png", "name": "a.png", "size": 1200}]});
        assert_eq!(
            checked("image", "", json!([]), png.clone()),
            Ok(MessageType::Image)
        );
        assert!(checked("image", "", json!(["file_1"]), json!({})).is_ok());
        let error = checked("image", "", json!([]), json!({})).unwrap_err();
        assert!(error.contains("at least one attachment"), "{error}");
        let error = checked("video", "", json!([]), png).unwrap_err();
        assert_eq!(
            error,
            "data.metadata.attachments[0].content_type must be video/* in a video message, not \"image/png\""
        );
        let described = |file: Value| json!({ "attachments": [file] });
        let error = checked(
            "file",
            "",
            json!([]),
            described(json!({"url": "ftp://x", "content_type": "text/plain"})),
        )
        .unwrap_err();
        assert!(
            error.starts_with("data.metadata.attachments[0].url must be an http(s) URL"),
            "{error}"
        );
        let error = checked(
            "file",
            "",
            json!([]),
            described(json!({"url": "https://x", "content_type": "plain"})),
        )
        .unwrap_err();
        assert!(error.contains("attachments[0].content_type must be a MIME type"));
        let error = checked(
            "file",
            "",
            json!([]),
            described(json!({"url": "https://x", "content_type": "text/plain", "colour": 1})),
        )
        .unwrap_err();
        assert!(
            error
                .starts_with("invalid data.metadata.attachments[0].colour: unknown field `colour`"),
            "{error}"
        );
        let error = checked("file", "", json!([""]), json!({})).unwrap_err();
        assert_eq!(error, "data.attached_files[0] is empty");
        let many: Vec<String> = (0..33).map(|i| format!("f{i}")).collect();
        let error = checked("file", "", json!(many), json!({})).unwrap_err();
        assert!(error.contains("at most 32 attachments"), "{error}");
    }

    #[test]
    fn rich_types_need_their_payload() {
        let location = json!({"payload": {"latitude": 48.85, "longitude": 2.35, "name": "Paris"}});
        assert!(checked("location", "", json!([]), location).is_ok());
        let error = checked("location", "", json!([]), json!({})).unwrap_err();
        assert_eq!(
            error,
            "data.metadata.payload is required in a location message"
        );
        let error = checked(
            "location",
            "",
            json!([]),
            json!({"payload": {"latitude": 91, "longitude": 0}}),
        )
        .unwrap_err();
        assert!(error.contains("latitude must be within"));
        let error = checked(
            "location",
            "",
            json!([]),
            json!({"payload": {"latitude": "north", "longitude": 0}}),
        )
        .unwrap_err();
        assert!(
            error.starts_with("invalid data.metadata.payload.latitude: invalid type"),
            "{error}"
        );

        let card = json!({"title": "Plan A", "buttons": [{"title": "Buy", "value": "buy-a"}, {"title": "Docs", "url": "https://docs.example"}]});
        assert!(checked("card", "", json!([]), json!({ "payload": card })).is_ok());
        let error = checked(
            "carousel",
            "",
            json!([]),
            json!({"payload": {"cards": [card, {"title": "Plan B", "buttons": [{"title": "?"}]}]}}),
        )
        .unwrap_err();
        assert_eq!(
            error,
            "data.metadata.payload.cards[1].buttons[0] needs either a value (sent back when picked) or a url"
        );
        let options =
            json!({"payload": {"options": [{"title": "Yes", "value": "y"}], "multiple": true}});
        assert!(checked("choice", "", json!([]), options.clone()).is_ok());
        let error = checked("dropdown", "", json!([]), options).unwrap_err();
        assert!(error.contains("multiple belongs to choice messages only"));
        let error = checked(
            "dropdown",
            "",
            json!([]),
            json!({"payload": {"options": []}}),
        )
        .unwrap_err();
        assert!(error.contains("options: 1 to 50 options"));
    }

    #[test]
    fn text_keeps_its_rules_and_payload_is_for_rich_types_only() {
        assert!(checked("text", "hi", json!([]), json!({})).is_ok());
        assert!(checked("markdown", "", json!(["f"]), json!({})).is_ok());
        assert!(checked("text", "", json!([]), json!({})).is_err());
        let error = checked("text", "hi", json!([]), json!({"payload": {}})).unwrap_err();
        assert!(error.contains("payload belongs to"));
        let error = checked("gif", "hi", json!([]), json!({})).unwrap_err();
        assert!(error.starts_with("data.type: unknown message type \"gif\""));
    }
}
