//! Validation of job and entry names. Job names become directory names in the store and entry
//! names appear in listings, so both are kept to plain, printable, single path components.

use crate::error::{Error, Result};

/// Longest accepted name, in bytes.
pub const MAX_NAME_LEN: usize = 200;

/// Checks that `name` is usable as a `what` ("job" or "entry") name: not empty, at most
/// [`MAX_NAME_LEN`] bytes, no `/`, no `..`, no leading `.`, no NUL or other control character.
pub fn validate(what: &'static str, name: &str) -> Result<()> {
    let why = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("it is longer than 200 bytes")
    } else if name.contains('/') {
        Some("it contains '/'")
    } else if name.contains("..") {
        Some("it contains '..'")
    } else if name.starts_with('.') {
        Some("it starts with '.'")
    } else if name.chars().any(char::is_control) {
        Some("it contains a control character (NUL, newline, tab, ...)")
    } else if name.chars().any(is_invisible) {
        Some(
            "it contains an invisible or direction-changing character (U+200B-U+200F, U+202A-U+202E, U+2066-U+2069, ...), which could disguise it in listings and logs",
        )
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(Error::InvalidName {
            what,
            name: name.to_owned(),
            why,
        }),
    }
}

/// Unicode format characters that change how text around them is shown (bidirectional
/// overrides and isolates, zero-width characters, the byte order mark).
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
}

#[cfg(test)]
mod tests {
    use super::validate;

    #[test]
    fn accepts_plain_names() {
        for ok in ["heat", "heat-3f2a", "grid.f64", "state_1", "Ünïcode name"] {
            validate("job", ok).unwrap();
        }
    }

    #[test]
    fn rejects_names_that_escape_or_garble() {
        for (bad, why) in [
            ("", "empty"),
            ("a/b", "'/'"),
            ("..", "'..'"),
            ("a..b", "'..'"),
            (".hidden", "starts with '.'"),
            ("nul\0", "control"),
            ("new\nline", "control"),
            ("evil\u{202E}gpj.exe", "direction-changing"),
            ("zero\u{200B}width", "invisible"),
        ] {
            let err = validate("entry", bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(err.contains("entry name"), "{err}");
        }
        assert!(validate("job", &"x".repeat(201)).is_err());
    }
}
