//! The word rules of `search`, shared by every backend: a message matches when every word of
//! the query is one of its words, compared case-insensitively (Unicode lowercase).

/// The words of `text`: runs of alphanumeric characters, lowercased.
pub(crate) fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for c in text.chars() {
        // ASCII first: most text is, and its rules are a byte compare away from Unicode's.
        if c.is_ascii() {
            if c.is_ascii_alphanumeric() {
                current.push(c.to_ascii_lowercase());
                continue;
            }
        } else if c.is_alphanumeric() {
            current.extend(c.to_lowercase());
            continue;
        }
        if !current.is_empty() {
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Whether every one of `wanted` (already lowercased words) is a word of `text`, by the rules
/// of [`words`]. Lazy, as it runs on every hit of a search: nothing is allocated per word and
/// a comparison stops at the first character that differs, so a long text costs one pass.
pub(crate) fn contains_words(text: &str, wanted: &[String]) -> bool {
    let mut found = vec![false; wanted.len()];
    let mut missing = wanted.len();
    for run in text.split(|c: char| !c.is_alphanumeric()) {
        if missing == 0 {
            break;
        }
        if run.is_empty() {
            continue;
        }
        for (seen, word) in found.iter_mut().zip(wanted) {
            if !*seen && run.chars().flat_map(char::to_lowercase).eq(word.chars()) {
                *seen = true;
                missing -= 1;
            }
        }
    }
    missing == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_follows_the_unicode_rules() {
        // Every ASCII character next to letters and digits, against the rule for any character.
        for byte in 0u8..128 {
            let c = char::from(byte);
            let text = format!("Ab{c}9z");
            let expected: Vec<String> = if c.is_alphanumeric() {
                vec![format!("ab{}9z", c.to_lowercase())]
            } else {
                vec!["ab".to_owned(), "9z".to_owned()]
            };
            assert_eq!(words(&text), expected, "{c:?}");
        }
    }

    #[test]
    fn contains_words_agrees_with_words() {
        let texts = [
            "Hello, World! hello",
            "Été à l'ÉCOLE",
            "İstanbul ǅemal K\u{212a}elvin",
            "",
            "a-b_c 42x",
        ];
        let queries = [
            vec!["hello"],
            vec!["world", "hello"],
            vec!["été", "école"],
            vec!["i\u{307}stanbul"],
            vec!["ǆemal"],
            vec!["kelvin"],
            vec!["a", "b", "c", "42x"],
            vec!["missing"],
            vec![],
        ];
        for text in texts {
            let present = words(text);
            for query in &queries {
                let wanted: Vec<String> = query.iter().map(|w| (*w).to_owned()).collect();
                let expected = wanted.iter().all(|w| present.contains(w));
                assert_eq!(
                    contains_words(text, &wanted),
                    expected,
                    "{text:?} {wanted:?}"
                );
            }
        }
    }
}
