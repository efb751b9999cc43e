//! What a message (`chat`, `note`) may carry, by its `type`: text, attachments and the
//! structured payload of the rich types, each checked with an error naming the field.
//!
//! - `text`, `markdown`: `message`, or at least one attachment.
//! - `image`, `audio`, `video`, `file`: at least one attachment; a described attachment's
//!   `content_type` must be of the type's kind (`image/…` for `image`).
//! - `location`, `card`, `carousel`, `dropdown`, `choice`: `metadata.payload` in the type's
//!   shape (see [`Payload`]); `message` is the text a client without the type shows.
//!
//! An attachment is a reference (a file id or URL, as the protocol has always taken) or a
//! described file `{"url", "content_type", "name"?, "size"?}`. Described files are stored as
//! their JSON and read back as objects (see `storage::Message`).

use serde::Deserialize;
use serde_json::{Map, Value};
use storage::MessageType;

use super::parse_data;
use crate::codec::{ErrorCode, ProtocolError};

/// Most attachments per message, and the longest reference to one.
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

/// A message's checked content.
#[derive(Debug, Clone, PartialEq)]
pub struct Content {
    pub kind: MessageType,
    /// References as given; described files as their compact JSON.
    pub attached_files: Vec<String>,
}

/// Checks `type`, `message`, `attached_files` and `metadata.payload` together.
pub fn check(
    kind: Option<&str>,
    message: &str,
    attached_files: &[Value],
    metadata: &Map<String, Value>,
) -> Result<Content, ProtocolError> {
    let kind = match kind {
        None => MessageType::Text,
        Some(k) => MessageType::parse(k).ok_or_else(|| {
            ProtocolError::bad_request(format!(
                "data.type: unknown message type {k:?}; one of text, markdown, image, audio, \
                 video, file, location, carousel, card, dropdown, choice"
            ))
        })?,
    };
    if attached_files.len() > MAX_ATTACHMENTS {
        return Err(ProtocolError::new(
            ErrorCode::TooLarge,
            "data.attached_files: at most 32 attachments",
        ));
    }
    let mut stored = Vec::with_capacity(attached_files.len());
    let mut content_types = Vec::with_capacity(attached_files.len());
    for (i, file) in attached_files.iter().enumerate() {
        let (text, content_type) = attachment(i, file)?;
        stored.push(text);
        content_types.push(content_type);
    }
    let payload = metadata.get("payload");
    let media = match kind {
        MessageType::Image => Some("image/"),
        MessageType::Audio => Some("audio/"),
        MessageType::Video => Some("video/"),
        _ => None,
    };
    match kind {
        MessageType::Text | MessageType::Markdown => {
            if message.is_empty() && stored.is_empty() {
                return Err(ProtocolError::bad_request(
                    "message may be empty only when attached_files is not",
                ));
            }
        }
        MessageType::Image | MessageType::Audio | MessageType::Video | MessageType::File => {
            if stored.is_empty() {
                return Err(ProtocolError::bad_request(format!(
                    "data.attached_files: {} message needs at least one attachment",
                    a(kind)
                )));
            }
            if let Some(prefix) = media {
                for (i, content_type) in content_types.iter().enumerate() {
                    if let Some(ct) = content_type {
                        if !ct.starts_with(prefix) {
                            return Err(ProtocolError::bad_request(format!(
                                "data.attached_files[{i}].content_type must be {prefix}* in {} \
                                 message, not {ct:?}",
                                a(kind)
                            )));
                        }
                    }
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
            return Ok(Content {
                kind,
                attached_files: stored,
            });
        }
    }
    if payload.is_some() {
        return Err(ProtocolError::bad_request(
            "data.metadata.payload belongs to location, card, carousel, dropdown and choice \
             messages only",
        ));
    }
    Ok(Content {
        kind,
        attached_files: stored,
    })
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

/// A described attachment.
#[derive(Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct File {
    url: String,
    content_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
}

/// The stored text of attachment `i`, and its content type when described.
fn attachment(i: usize, file: &Value) -> Result<(String, Option<String>), ProtocolError> {
    let too_large = || {
        ProtocolError::new(
            ErrorCode::TooLarge,
            format!("data.attached_files[{i}] is longer than 2048 bytes"),
        )
    };
    match file {
        Value::String(reference) => {
            if reference.is_empty() {
                return Err(ProtocolError::bad_request(format!(
                    "data.attached_files[{i}] is empty"
                )));
            }
            if reference.len() > MAX_ATTACHMENT_BYTES {
                return Err(too_large());
            }
            // Stored described files start with `{`: a reference never does.
            if reference.starts_with('{') {
                return Err(ProtocolError::bad_request(format!(
                    "data.attached_files[{i}]: a file reference may not start with '{{' \
                     (describe a file as an object)"
                )));
            }
            Ok((reference.clone(), None))
        }
        Value::Object(_) => {
            let file: File = at_path(&format!("attached_files[{i}]"), file)?;
            let field = |name: &str| format!("data.attached_files[{i}].{name}");
            if !(file.url.starts_with("https://") || file.url.starts_with("http://")) {
                return Err(ProtocolError::bad_request(format!(
                    "{} must be an http(s) URL",
                    field("url")
                )));
            }
            if !is_mime_type(&file.content_type) {
                return Err(ProtocolError::bad_request(format!(
                    "{} must be a MIME type such as image/png",
                    field("content_type")
                )));
            }
            if file
                .name
                .as_ref()
                .is_some_and(|n| n.is_empty() || n.len() > MAX_NAME_BYTES)
            {
                return Err(ProtocolError::bad_request(format!(
                    "{} must be 1 to 255 bytes",
                    field("name")
                )));
            }
            let text = serde_json::to_string(&file).unwrap_or_default();
            if text.len() > MAX_ATTACHMENT_BYTES {
                return Err(too_large());
            }
            Ok((text, Some(file.content_type)))
        }
        _ => Err(ProtocolError::bad_request(format!(
            "data.attached_files[{i}] must be a file reference (string) or \
             {{\"url\", \"content_type\", \"name\"?, \"size\"?}}"
        ))),
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
        let message = e
            .message
            .replacen("invalid data.", &format!("invalid data.{path}."), 1)
            .replacen("invalid data:", &format!("invalid data.{path}:"), 1);
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
    ) -> Result<Content, String> {
        let files = files.as_array().cloned().unwrap_or_default();
        let metadata = metadata.as_object().cloned().unwrap_or_default();
        check(Some(kind), message, &files, &metadata).map_err(|e| e.message)
    }

    #[test]
    fn media_messages_need_attachments_of_their_kind() {
        let png = json!([{"url": "https://cdn.example/a.png", "content_type": "image/png", "name": "a.png", "size": 1200}]);
        let image = checked("image", "", png.clone(), json!({})).unwrap();
        assert_eq!(
            image.attached_files,
            [
                r#"{"url":"https://cdn.example/a.png","content_type":"image/png","name":"a.png","size":1200}"#
            ]
        );
        assert!(checked("image", "", json!(["file_1"]), json!({})).is_ok());
        let error = checked("image", "", json!([]), json!({})).unwrap_err();
        assert!(error.contains("at least one attachment"), "{error}");
        let error = checked("video", "", png, json!({})).unwrap_err();
        assert_eq!(
            error,
            "data.attached_files[0].content_type must be video/* in a video message, not \"image/png\""
        );
        let error = checked(
            "file",
            "",
            json!([{"url": "ftp://x", "content_type": "text/plain"}]),
            json!({}),
        )
        .unwrap_err();
        assert_eq!(error, "data.attached_files[0].url must be an http(s) URL");
        let error = checked(
            "file",
            "",
            json!([{"url": "https://x", "content_type": "plain"}]),
            json!({}),
        )
        .unwrap_err();
        assert!(error.contains("attached_files[0].content_type must be a MIME type"));
        let error = checked(
            "file",
            "",
            json!([{"url": "https://x", "content_type": "text/plain", "colour": 1}]),
            json!({}),
        )
        .unwrap_err();
        assert!(
            error.starts_with("invalid data.attached_files[0].colour: unknown field `colour`"),
            "{error}"
        );
        let error = checked("file", "", json!([r#"{"url":"https://x"}"#]), json!({})).unwrap_err();
        assert!(error.contains("may not start with '{'"), "{error}");
        let error = checked("file", "", json!([5]), json!({})).unwrap_err();
        assert!(error.starts_with("data.attached_files[0] must be a file reference"));
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
