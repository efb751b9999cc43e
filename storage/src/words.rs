//! The word rules of `search`, shared by every backend: a message matches when every word of
//! the query is one of its words, compared case-insensitively (Unicode lowercase).

/// The words of `text`: runs of alphanumeric characters, lowercased.
pub(crate) fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for c in text.chars() {
        if c.is_alphanumeric() {
            current.extend(c.to_lowercase());
        } else if !current.is_empty() {
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Whether every one of `wanted` (already lowercased words) is a word of `text`.
pub(crate) fn contains_words(text: &str, wanted: &[String]) -> bool {
    let present = words(text);
    wanted.iter().all(|w| present.contains(w))
}
