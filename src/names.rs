//! Validation of the names a peer hands us: channels, event types and publisher event ids (API.md).
//!
//! Owns: the allowed byte classes and length limits for those three names, and the error that
//! says which rule a name broke.
//! Must never: allocate, panic on any input, or accept a byte outside its class. Other modules
//! (SSE cursors, URL paths, log lines) rely on a valid name holding no `~`, `,`, whitespace,
//! CR or LF, so widening a class is a protocol change, not a tweak.
//!
//! Limits: channel 1..=255 bytes, type 1..=128 bytes, id 1..=128 bytes, all ASCII.
//! Every check is one table lookup per byte because it runs on each publish.

use std::fmt;

/// Longest channel name in bytes.
pub const CHANNEL_MAX: usize = 255;
/// Longest event type in bytes.
pub const TYPE_MAX: usize = 128;
/// Longest publisher-given event id in bytes.
pub const ID_MAX: usize = 128;

/// Why a name was refused. `what` is the field name ("channel", "type" or "id") so the message
/// can be sent back to the peer as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    Empty {
        what: &'static str,
    },
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    /// `at` is a byte offset; `ch` is the whole character starting there, so a multi-byte
    /// character is reported as itself rather than as a stray byte.
    BadChar {
        what: &'static str,
        ch: char,
        at: usize,
    },
}

/// One class of names: the rule as data, so the check and the error message cannot drift apart.
struct Class {
    what: &'static str,
    max: usize,
    chars: &'static str,
    allowed: [bool; 256],
}

/// Built at compile time so the hot path is a plain load per byte, with no branches on ranges.
const fn table(extra: &[u8]) -> [bool; 256] {
    let mut allowed = [false; 256];
    let mut b = 0;
    while b < 256 {
        allowed[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    // Evaluated at compile time: a bad index here fails the build, it cannot panic at run time.
    let mut i = 0;
    while i < extra.len() {
        allowed[extra[i] as usize] = true;
        i += 1;
    }
    allowed
}

static CHANNEL: Class = Class {
    what: "channel",
    max: CHANNEL_MAX,
    chars: "[A-Za-z0-9._:@/-]",
    allowed: table(b"._:@/-"),
};

static TYPE: Class = Class {
    what: "type",
    max: TYPE_MAX,
    chars: "[A-Za-z0-9._-]",
    allowed: table(b"._-"),
};

static EVENT_ID: Class = Class {
    what: "id",
    max: ID_MAX,
    chars: "[A-Za-z0-9._:-]",
    allowed: table(b"._:-"),
};

/// Checks a channel name: 1..=255 bytes of `[A-Za-z0-9._:@/-]`.
pub fn validate_channel(s: &str) -> Result<(), NameError> {
    validate(&CHANNEL, s)
}

/// Checks an event type: 1..=128 bytes of `[A-Za-z0-9._-]`.
pub fn validate_type(s: &str) -> Result<(), NameError> {
    validate(&TYPE, s)
}

/// Checks a publisher-given event id: 1..=128 bytes of `[A-Za-z0-9._:-]`.
pub fn validate_event_id(s: &str) -> Result<(), NameError> {
    validate(&EVENT_ID, s)
}

fn validate(class: &Class, s: &str) -> Result<(), NameError> {
    let what = class.what;
    if s.is_empty() {
        return Err(NameError::Empty { what });
    }
    // Length first: it is O(1) and bounds the scan below for hostile input.
    if s.len() > class.max {
        return Err(NameError::TooLong {
            what,
            len: s.len(),
            max: class.max,
        });
    }
    // A u8 always indexes a 256-entry table, so this lookup cannot go out of bounds.
    match s.bytes().position(|b| !class.allowed[usize::from(b)]) {
        None => Ok(()),
        Some(at) => {
            // Every non-ASCII byte is refused, so the first refused byte is ASCII or a lead
            // byte: always a char boundary. The fallback only keeps this panic-free.
            let ch = s
                .get(at..)
                .and_then(|rest| rest.chars().next())
                .unwrap_or(char::REPLACEMENT_CHARACTER);
            Err(NameError::BadChar { what, ch, at })
        }
    }
}

fn class_of(what: &str) -> Option<&'static Class> {
    [&CHANNEL, &TYPE, &EVENT_ID]
        .into_iter()
        .find(|class| class.what == what)
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match *self {
            NameError::Empty { what }
            | NameError::TooLong { what, .. }
            | NameError::BadChar { what, .. } => what,
        };
        // The full rule goes in every message so a client can fix its input without the docs.
        match class_of(what) {
            Some(class) => write!(
                f,
                "{what} must be 1..={} bytes of {}; ",
                class.max, class.chars
            )?,
            None => write!(f, "{what} is not a valid name; ")?,
        }
        match *self {
            NameError::Empty { .. } => f.write_str("found an empty string"),
            NameError::TooLong { len, .. } => write!(f, "found {len} bytes"),
            // Debug form escapes control characters, so the message stays one printable line.
            NameError::BadChar { ch, at, .. } => write!(f, "found {ch:?} at byte {at}"),
        }
    }
}

impl std::error::Error for NameError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_every_allowed_character() {
        let alnum = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        assert_eq!(validate_channel(&format!("{alnum}._:@/-")), Ok(()));
        assert_eq!(validate_type(&format!("{alnum}._-")), Ok(()));
        assert_eq!(validate_event_id(&format!("{alnum}._:-")), Ok(()));
    }

    #[test]
    fn typical_names() {
        assert_eq!(validate_channel("doc.42"), Ok(()));
        assert_eq!(validate_channel("user:alice@example.com/inbox"), Ok(()));
        assert_eq!(validate_type("document.edit"), Ok(()));
        assert_eq!(
            validate_event_id("0193f1d2-7c1e-7a3b-9f00-0123456789ab"),
            Ok(())
        );
        assert_eq!(validate_event_id("x"), Ok(()));
    }

    #[test]
    fn tables_match_the_documented_classes_for_every_byte() {
        // Compare against an independent, obviously-correct definition for all 256 bytes.
        for b in 0..=255u8 {
            let alnum = b.is_ascii_alphanumeric();
            assert_eq!(
                CHANNEL.allowed[usize::from(b)],
                alnum || b"._:@/-".contains(&b),
                "channel byte {b}"
            );
            assert_eq!(
                TYPE.allowed[usize::from(b)],
                alnum || b"._-".contains(&b),
                "type byte {b}"
            );
            assert_eq!(
                EVENT_ID.allowed[usize::from(b)],
                alnum || b"._:-".contains(&b),
                "id byte {b}"
            );
        }
    }

    #[test]
    fn class_differences() {
        // `@` and `/` are channel-only; `:` is channel and id but not type.
        assert!(validate_channel("a@b/c").is_ok());
        assert_eq!(
            validate_type("a@b"),
            Err(NameError::BadChar {
                what: "type",
                ch: '@',
                at: 1
            })
        );
        assert_eq!(
            validate_event_id("a/b"),
            Err(NameError::BadChar {
                what: "id",
                ch: '/',
                at: 1
            })
        );
        assert!(validate_event_id("a:b").is_ok());
        assert_eq!(
            validate_type("a:b"),
            Err(NameError::BadChar {
                what: "type",
                ch: ':',
                at: 1
            })
        );
    }

    #[test]
    fn empty_is_refused() {
        assert_eq!(
            validate_channel(""),
            Err(NameError::Empty { what: "channel" })
        );
        assert_eq!(validate_type(""), Err(NameError::Empty { what: "type" }));
        assert_eq!(validate_event_id(""), Err(NameError::Empty { what: "id" }));
    }

    #[test]
    fn length_limits_are_inclusive() {
        assert!(validate_channel(&"a".repeat(CHANNEL_MAX)).is_ok());
        assert_eq!(
            validate_channel(&"a".repeat(CHANNEL_MAX + 1)),
            Err(NameError::TooLong {
                what: "channel",
                len: 256,
                max: 255
            })
        );
        assert!(validate_type(&"a".repeat(TYPE_MAX)).is_ok());
        assert_eq!(
            validate_type(&"a".repeat(TYPE_MAX + 1)),
            Err(NameError::TooLong {
                what: "type",
                len: 129,
                max: 128
            })
        );
        assert!(validate_event_id(&"a".repeat(ID_MAX)).is_ok());
        assert_eq!(
            validate_event_id(&"a".repeat(ID_MAX + 1)),
            Err(NameError::TooLong {
                what: "id",
                len: 129,
                max: 128
            })
        );
    }

    #[test]
    fn length_counts_bytes_not_chars() {
        // 128 chars but 256 bytes: must be TooLong, not BadChar.
        let s = "é".repeat(128);
        assert_eq!(
            validate_type(&s),
            Err(NameError::TooLong {
                what: "type",
                len: 256,
                max: 128
            })
        );
    }

    #[test]
    fn reports_first_bad_character_with_byte_offset() {
        assert_eq!(
            validate_channel("doc 42 x"),
            Err(NameError::BadChar {
                what: "channel",
                ch: ' ',
                at: 3
            })
        );
        assert_eq!(
            validate_channel("~"),
            Err(NameError::BadChar {
                what: "channel",
                ch: '~',
                at: 0
            })
        );
        assert_eq!(
            validate_channel("abc,"),
            Err(NameError::BadChar {
                what: "channel",
                ch: ',',
                at: 3
            })
        );
    }

    #[test]
    fn multibyte_character_reported_whole() {
        assert_eq!(
            validate_channel("ab€c"),
            Err(NameError::BadChar {
                what: "channel",
                ch: '€',
                at: 2
            })
        );
        assert_eq!(
            validate_event_id("é"),
            Err(NameError::BadChar {
                what: "id",
                ch: 'é',
                at: 0
            })
        );
    }

    #[test]
    fn control_and_separator_bytes_refused_everywhere() {
        for bad in [
            "\r", "\n", "\0", "\t", "~", ",", "%", "+", "*", "?", "#", "\u{7f}",
        ] {
            let s = format!("a{bad}b");
            assert!(validate_channel(&s).is_err(), "channel {s:?}");
            assert!(validate_type(&s).is_err(), "type {s:?}");
            assert!(validate_event_id(&s).is_err(), "id {s:?}");
        }
    }

    #[test]
    fn display_states_the_rule_and_the_fault() {
        let e = validate_channel("doc 42").unwrap_err();
        assert_eq!(
            e.to_string(),
            "channel must be 1..=255 bytes of [A-Za-z0-9._:@/-]; found ' ' at byte 3"
        );
        assert_eq!(
            validate_type("").unwrap_err().to_string(),
            "type must be 1..=128 bytes of [A-Za-z0-9._-]; found an empty string"
        );
        assert_eq!(
            validate_event_id(&"a".repeat(200)).unwrap_err().to_string(),
            "id must be 1..=128 bytes of [A-Za-z0-9._:-]; found 200 bytes"
        );
    }

    #[test]
    fn display_escapes_control_characters() {
        let msg = validate_channel("a\nb").unwrap_err().to_string();
        assert!(!msg.contains('\n'), "{msg:?}");
        assert!(msg.ends_with("found '\\n' at byte 1"), "{msg:?}");
    }

    #[test]
    fn display_of_hand_built_error_with_unknown_field() {
        let e = NameError::Empty { what: "user" };
        assert_eq!(
            e.to_string(),
            "user is not a valid name; found an empty string"
        );
    }
}
