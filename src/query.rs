//! Percent-decoding of URL path segments and query strings (RFC 3986), e.g. a channel in
//! `/channels/doc%2F42/history` or `?channel=A&channel=B&types=doc.*`.
//!
//! Owns: turning raw URL text into owned UTF-8 strings, and splitting a query into pairs.
//! Must never: guess at a malformed escape (a `%` not followed by two hex digits is an error,
//! not a literal), return text that is not UTF-8, or panic on any input. It does not validate
//! what the text means; channel and type names go through `names` afterwards.
//!
//! Limits: output is never longer than input, so the caller's request-size bound covers it.
//! Input is the part after `?` (for queries) with any `#fragment` already removed.

use std::fmt;

/// Why URL text could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryError {
    /// A `%` at byte `at` (of the string handed in) is not followed by two hex digits.
    BadEscape { at: usize },
    /// The decoded bytes are not valid UTF-8.
    NotUtf8,
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueryError::BadEscape { at } => write!(
                f,
                "bad percent-escape at byte {at}: '%' must be followed by two hex digits"
            ),
            QueryError::NotUtf8 => f.write_str("percent-decoded text is not valid UTF-8"),
        }
    }
}

impl std::error::Error for QueryError {}

/// Decodes `%XX` escapes, as in a path segment: `+` stays `+` there, because only the
/// form-encoding of query strings gives it the meaning of a space.
pub fn percent_decode(s: &str) -> Result<String, QueryError> {
    decode(s, false)
}

/// Decodes one key or value of a query string: `%XX` escapes, and `+` as a space.
pub fn percent_decode_query_component(s: &str) -> Result<String, QueryError> {
    decode(s, true)
}

/// Splits a query string (without the leading `?`) into decoded `(key, value)` pairs in order.
/// Empty segments (`a=1&&b=2`, a trailing `&`) are skipped; a key without `=` has value "";
/// only the first `=` splits, so `a=b=c` gives `("a", "b=c")`. An error's `at` is a byte offset
/// into `query`, and an error on one pair does not stop the pairs after it.
pub fn query_pairs(query: &str) -> impl Iterator<Item = Result<(String, String), QueryError>> + '_ {
    query
        .split('&')
        .scan(0usize, |offset, segment| {
            let start = *offset;
            *offset += segment.len() + 1;
            Some((start, segment))
        })
        .filter(|(_, segment)| !segment.is_empty())
        .map(|(start, segment)| {
            let (key, value, value_start) = match segment.split_once('=') {
                Some((key, value)) => (key, value, start + key.len() + 1),
                None => (segment, "", start + segment.len()),
            };
            let key = percent_decode_query_component(key).map_err(|e| shift(e, start))?;
            let value = percent_decode_query_component(value).map_err(|e| shift(e, value_start))?;
            Ok((key, value))
        })
}

/// Re-bases an error offset from a component to the whole query.
fn shift(e: QueryError, by: usize) -> QueryError {
    match e {
        QueryError::BadEscape { at } => QueryError::BadEscape { at: at + by },
        QueryError::NotUtf8 => QueryError::NotUtf8,
    }
}

fn decode(s: &str, plus_is_space: bool) -> Result<String, QueryError> {
    let bytes = s.as_bytes();
    // Most names need no decoding; skip the byte walk and the UTF-8 re-check for them.
    if !bytes
        .iter()
        .any(|&b| b == b'%' || (plus_is_space && b == b'+'))
    {
        return Ok(s.to_owned());
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hi = bytes.get(i + 1).copied().and_then(hex_value);
                let lo = bytes.get(i + 2).copied().and_then(hex_value);
                match (hi, lo) {
                    (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                    _ => return Err(QueryError::BadEscape { at: i }),
                }
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    // Escapes can spell any byte sequence, so the result must be checked as a whole.
    String::from_utf8(out).map_err(|_| QueryError::NotUtf8)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(q: &str) -> Vec<Result<(String, String), QueryError>> {
        query_pairs(q).collect()
    }

    fn ok(k: &str, v: &str) -> Result<(String, String), QueryError> {
        Ok((k.to_owned(), v.to_owned()))
    }

    #[test]
    fn plain_text_passes_through() {
        assert_eq!(percent_decode("doc.42").as_deref(), Ok("doc.42"));
        assert_eq!(percent_decode("").as_deref(), Ok(""));
        assert_eq!(percent_decode("héllo").as_deref(), Ok("héllo"));
    }

    #[test]
    fn escapes_decode_in_both_cases() {
        assert_eq!(percent_decode("doc%2F42").as_deref(), Ok("doc/42"));
        assert_eq!(percent_decode("doc%2f42").as_deref(), Ok("doc/42"));
        assert_eq!(percent_decode("%41%62%7A").as_deref(), Ok("Abz"));
        assert_eq!(percent_decode("%25").as_deref(), Ok("%"));
        // A decoded `%` must not start a second round of decoding.
        assert_eq!(percent_decode("%2541").as_deref(), Ok("%41"));
        assert_eq!(percent_decode("%C3%A9").as_deref(), Ok("é"));
        assert_eq!(percent_decode("a%20b").as_deref(), Ok("a b"));
    }

    #[test]
    fn plus_is_literal_in_paths_and_space_in_queries() {
        assert_eq!(percent_decode("a+b").as_deref(), Ok("a+b"));
        assert_eq!(percent_decode_query_component("a+b").as_deref(), Ok("a b"));
        assert_eq!(
            percent_decode_query_component("a%2Bb").as_deref(),
            Ok("a+b")
        );
        assert_eq!(percent_decode_query_component("++").as_deref(), Ok("  "));
    }

    #[test]
    fn bad_escapes_report_position_of_percent() {
        for (s, at) in [
            ("%", 0),
            ("ab%", 2),
            ("ab%4", 2),
            ("%G0", 0),
            ("%0G", 0),
            ("x%%41", 1),
            ("%41%", 3),
            ("% 41", 0),
            ("%+1", 0),
        ] {
            assert_eq!(
                percent_decode(s),
                Err(QueryError::BadEscape { at }),
                "{s:?}"
            );
            assert_eq!(
                percent_decode_query_component(s),
                Err(QueryError::BadEscape { at }),
                "{s:?}"
            );
        }
    }

    #[test]
    fn escape_before_multibyte_char_is_bad_not_a_panic() {
        // The two bytes after `%` are the start of 'é', not hex digits.
        assert_eq!(percent_decode("%é"), Err(QueryError::BadEscape { at: 0 }));
        assert_eq!(percent_decode("a%4é"), Err(QueryError::BadEscape { at: 1 }));
    }

    #[test]
    fn invalid_utf8_is_refused() {
        assert_eq!(percent_decode("%FF"), Err(QueryError::NotUtf8));
        assert_eq!(percent_decode("%C3"), Err(QueryError::NotUtf8));
        assert_eq!(percent_decode("%C3%28"), Err(QueryError::NotUtf8));
        // Overlong encoding of '/', a classic path-traversal trick.
        assert_eq!(percent_decode("%C0%AF"), Err(QueryError::NotUtf8));
        // Surrogate half.
        assert_eq!(percent_decode("%ED%A0%80"), Err(QueryError::NotUtf8));
    }

    #[test]
    fn nul_and_newline_decode_faithfully() {
        // Deciding whether these are allowed is the name validator's job, not the decoder's.
        assert_eq!(percent_decode("a%00b%0A").as_deref(), Ok("a\0b\n"));
    }

    #[test]
    fn pairs_basic() {
        assert_eq!(
            pairs("channel=A&channel=B&types=doc.*"),
            vec![ok("channel", "A"), ok("channel", "B"), ok("types", "doc.*")]
        );
    }

    #[test]
    fn pairs_skip_empty_segments() {
        assert_eq!(pairs(""), vec![]);
        assert_eq!(pairs("&&&"), vec![]);
        assert_eq!(pairs("&a=1&&b=2&"), vec![ok("a", "1"), ok("b", "2")]);
    }

    #[test]
    fn pairs_key_without_equals_and_edge_splits() {
        assert_eq!(pairs("flag"), vec![ok("flag", "")]);
        assert_eq!(pairs("a="), vec![ok("a", "")]);
        assert_eq!(pairs("=v"), vec![ok("", "v")]);
        assert_eq!(pairs("="), vec![ok("", "")]);
        assert_eq!(pairs("a=b=c"), vec![ok("a", "b=c")]);
    }

    #[test]
    fn pairs_decode_keys_and_values() {
        assert_eq!(
            pairs("last%5Fevent%5Fid=doc.1~k3x9~17%2Cdoc.2~ab~0&q=a+b"),
            vec![
                ok("last_event_id", "doc.1~k3x9~17,doc.2~ab~0"),
                ok("q", "a b")
            ]
        );
        // An encoded `&` or `=` is data, not a separator.
        assert_eq!(pairs("a%26b=c%3Dd"), vec![ok("a&b", "c=d")]);
    }

    #[test]
    fn pairs_error_offsets_are_relative_to_whole_query() {
        assert_eq!(
            pairs("a=1&b%=2&c=3"),
            vec![
                ok("a", "1"),
                Err(QueryError::BadEscape { at: 5 }),
                ok("c", "3")
            ]
        );
        assert_eq!(
            pairs("a=1&&bb=x%Z"),
            vec![ok("a", "1"), Err(QueryError::BadEscape { at: 9 })]
        );
        assert_eq!(pairs("k%ZZ"), vec![Err(QueryError::BadEscape { at: 1 })]);
        assert_eq!(pairs("x=%FF"), vec![Err(QueryError::NotUtf8)]);
    }

    #[test]
    fn display_says_what_went_wrong() {
        assert_eq!(
            QueryError::BadEscape { at: 4 }.to_string(),
            "bad percent-escape at byte 4: '%' must be followed by two hex digits"
        );
        assert_eq!(
            QueryError::NotUtf8.to_string(),
            "percent-decoded text is not valid UTF-8"
        );
    }
}
