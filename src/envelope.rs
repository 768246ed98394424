//! The publish envelope's fast path: one pass over a body in its common shape, no allocation.
//!
//! Owns [`scan_one`] and [`scan_batch`] (HTTP bodies) and [`scan_ws_publish`] (a WebSocket
//! `publish` message), which find an envelope's fields as slices of the text when every one is
//! in the plain form publishers send: an object with the known keys once each, string values
//! without escapes, and `data` any JSON value whose strings have no escapes and whose nesting
//! is at most [`DEPTH_MAX`] deep. `data` is validated as it is skipped (strings, numbers,
//! literals, arrays, objects, the JSON grammar exactly), so a slice this module returns is JSON
//! that `serde_json` accepts too.
//!
//! Must never: accept what `serde_json` would refuse, or read a field differently from it (a
//! differential test for each shape, in `api` and `ws::protocol`, holds it to that), or
//! produce an error of its own. Anything outside the plain form (an escape, an unknown or
//! repeated key, a deeper `data`, bad JSON) is `None`, and the caller parses the text with
//! `serde_json`, which also names what is wrong.

/// Deepest `data` nesting followed here; deeper goes to `serde_json` (whose limit is 128).
pub const DEPTH_MAX: usize = 32;

/// One envelope's fields, borrowed from the text: what the fast path reads, and what `api`
/// and `ws::protocol` make a draft of (`api::make_draft`) whichever way they were read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fields<'a> {
    pub channel: &'a str,
    pub event_type: &'a str,
    pub id: Option<&'a str>,
    /// The value's exact text, without the whitespace around it.
    pub data: &'a str,
    pub source: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
}

/// A body that is one envelope object (whitespace around it allowed).
pub fn scan_one(text: &str) -> Option<Fields<'_>> {
    scan_whole(text, Shape::Http).map(|(fields, _)| fields)
}

/// A WebSocket `{"op":"publish",...}` message: an envelope's fields, `op` equal to `publish`,
/// and `ref` a string or a number when present.
pub fn scan_ws_publish(text: &str) -> Option<WsPublish<'_>> {
    scan_whole(text, Shape::WsPublish).map(|(fields, reference)| WsPublish { fields, reference })
}

/// A text that is one object of `shape`, whitespace around it allowed.
fn scan_whole(text: &str, shape: Shape) -> Option<(Fields<'_>, Option<&str>)> {
    let mut scan = Scanner::new(text);
    scan.skip_ws();
    let read = scan.envelope(shape)?;
    scan.skip_ws();
    scan.at_end().then_some(read)
}

/// A WebSocket publish read on the fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsPublish<'a> {
    pub fields: Fields<'a>,
    /// `ref`'s exact text: a string with its quotes, or a number.
    pub reference: Option<&'a str>,
}

/// Which keys an object may hold besides an envelope's.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// None: an HTTP publish body.
    Http,
    /// `op` (required, `"publish"`) and `ref`.
    WsPublish,
}

/// A body that is a non-empty array of envelope objects (an empty one is `None`: the caller's
/// slow path says why it is refused).
pub fn scan_batch(text: &str) -> Option<Vec<Fields<'_>>> {
    let mut scan = Scanner::new(text);
    scan.skip_ws();
    scan.eat(b'[')?;
    let mut items = Vec::new();
    loop {
        scan.skip_ws();
        items.push(scan.envelope(Shape::Http)?.0);
        scan.skip_ws();
        match scan.next()? {
            b',' => continue,
            b']' => break,
            _ => return None,
        }
    }
    scan.skip_ws();
    scan.at_end().then_some(items)
}

/// The first byte at or after `from` that a JSON string cannot hold as it is (`"`, `\\` or a
/// control character), found eight bytes a step; `None` when there is none. Shared with the
/// JSON escaping of `http::codec`, which copies the runs between such bytes whole.
#[inline(always)]
pub fn first_string_stop(bytes: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    loop {
        if let Some(chunk) = bytes.get(at..at + 8) {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            let stops = string_stops(u64::from_le_bytes(word));
            if stops == 0 {
                at += 8;
                continue;
            }
            return Some(at + (stops.trailing_zeros() / 8) as usize);
        }
        // Fewer than eight bytes left: one at a time.
        match bytes.get(at) {
            Some(&b) if b != b'"' && b != b'\\' && b >= 0x20 => at += 1,
            Some(_) => return Some(at),
            None => return None,
        }
    }
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// High bit set in each byte of `word` that ends a plain string's run: `"`, `\` or a control
/// character. The lowest set byte is always exact (borrows only run upward).
fn string_stops(word: u64) -> u64 {
    let quote = word ^ (ONES * u64::from(b'"'));
    let backslash = word ^ (ONES * u64::from(b'\\'));
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x;
    let control = word.wrapping_sub(ONES * 0x20) & !word;
    (zero_byte(quote) | zero_byte(backslash) | control) & HIGHS
}

struct Scanner<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Scanner<'a> {
    fn new(text: &'a str) -> Self {
        Scanner { text, pos: 0 }
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Some(b)
    }

    fn eat(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    fn at_end(&self) -> bool {
        self.pos == self.text.len()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.pos + word.len();
        (self.bytes().get(self.pos..end)? == word).then(|| self.pos = end)
    }

    /// A string without escapes or control characters; its content. The text is UTF-8 and
    /// the quotes are ASCII, so the slice falls on character boundaries. Inlined into each
    /// caller: most strings are keys of a few bytes, where a call's set-up (saving registers,
    /// loading the masks) cost as much as the scan (376 of 2,982 instructions per event in the
    /// `parse_drafts` bench).
    #[inline(always)]
    fn plain_string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.pos;
        let stop = first_string_stop(self.bytes(), start)?;
        if self.bytes()[stop] != b'"' {
            return None;
        }
        self.pos = stop + 1;
        Some(&self.text[start..stop])
    }

    /// `null` or a plain string.
    fn optional_string(&mut self) -> Option<Option<&'a str>> {
        if self.peek()? == b'n' {
            self.literal(b"null")?;
            return Some(None);
        }
        self.plain_string().map(Some)
    }

    /// One envelope object, and its `ref` in the WebSocket shape.
    fn envelope(&mut self, shape: Shape) -> Option<(Fields<'a>, Option<&'a str>)> {
        self.eat(b'{')?;
        let (mut channel, mut event_type, mut data) = (None, None, None);
        let (mut id, mut source, mut correlation_id) = (None, None, None);
        let ws = shape == Shape::WsPublish;
        let (mut op, mut reference) = (None, None);
        loop {
            self.skip_ws();
            let key = self.plain_string()?;
            self.skip_ws();
            self.eat(b':')?;
            self.skip_ws();
            // A repeated key is refused (`None`), as serde's derive does.
            match key {
                "channel" if channel.is_none() => channel = Some(self.plain_string()?),
                "type" if event_type.is_none() => event_type = Some(self.plain_string()?),
                "data" if data.is_none() => data = Some(self.value_text()?),
                "id" if id.is_none() => id = Some(self.optional_string()?),
                "source" if source.is_none() => source = Some(self.optional_string()?),
                "correlation_id" if correlation_id.is_none() => {
                    correlation_id = Some(self.optional_string()?)
                }
                "op" if ws && op.is_none() => op = Some(self.plain_string()?),
                "ref" if ws && reference.is_none() => reference = Some(self.reference()?),
                _ => return None,
            }
            self.skip_ws();
            match self.next()? {
                b',' => continue,
                b'}' => break,
                _ => return None,
            }
        }
        // The WebSocket request's `data` is optional, so serde reads `null` as no data (a
        // refusal): that answer is serde's to give.
        if ws && (op? != "publish" || data? == "null") {
            return None;
        }
        let fields = Fields {
            channel: channel?,
            event_type: event_type?,
            id: id.flatten(),
            data: data?,
            source: source.flatten(),
            correlation_id: correlation_id.flatten(),
        };
        Some((fields, reference))
    }

    /// A `ref`: a plain string (its text with the quotes) or a number; anything else, `null`
    /// included, is left to serde and the protocol's own check.
    fn reference(&mut self) -> Option<&'a str> {
        let start = self.pos;
        match self.peek()? {
            b'"' => self.plain_string().map(drop)?,
            b'-' | b'0'..=b'9' => self.number()?,
            _ => return None,
        }
        Some(&self.text[start..self.pos])
    }

    /// Any JSON value, validated; its exact text.
    fn value_text(&mut self) -> Option<&'a str> {
        let start = self.pos;
        self.value(0)?;
        Some(&self.text[start..self.pos])
    }

    fn value(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'"' => self.plain_string().map(drop),
            b'{' => self.container(depth, b'}', true),
            b'[' => self.container(depth, b']', false),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    /// An object (`keyed`) or an array, its opening bracket next.
    fn container(&mut self, depth: usize, close: u8, keyed: bool) -> Option<()> {
        if depth >= DEPTH_MAX {
            return None;
        }
        self.pos += 1;
        self.skip_ws();
        if self.peek()? == close {
            self.pos += 1;
            return Some(());
        }
        loop {
            self.skip_ws();
            if keyed {
                self.plain_string()?;
                self.skip_ws();
                self.eat(b':')?;
                self.skip_ws();
            }
            self.value(depth + 1)?;
            self.skip_ws();
            match self.next()? {
                b',' => continue,
                b if b == close => return Some(()),
                _ => return None,
            }
        }
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.next()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            self.some_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            self.some_digits()?;
        }
        Some(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let start = self.pos;
        self.digits();
        (self.pos > start).then_some(())
    }
}

#[cfg(test)]
pub(crate) mod generated {
    /// Generates `cases` texts with `make` and reads each both ways with `read`, which checks
    /// the fields itself where both read it and says whether the fast path read it and what
    /// serde said. A text the fast path reads and serde refuses fails the test. Returns how
    /// many the fast path read and how many only serde read.
    pub(crate) fn tally(
        gen: &mut EnvelopeGen,
        cases: usize,
        mut make: impl FnMut(&mut EnvelopeGen) -> String,
        mut read: impl FnMut(&str) -> (bool, Result<(), String>),
    ) -> (usize, usize) {
        let (mut fast_hits, mut serde_only) = (0, 0);
        for _ in 0..cases {
            let text = make(gen);
            let text = gen.mutate(text);
            match read(&text) {
                (true, Ok(())) => fast_hits += 1,
                (true, Err(e)) => panic!("the fast path read what serde refuses ({e}): {text}"),
                (false, Ok(())) => serde_only += 1,
                (false, Err(_)) => {}
            }
        }
        (fast_hits, serde_only)
    }

    /// Random envelopes, valid and not, for the differential tests against serde_json.
    pub(crate) struct EnvelopeGen(u64);

    impl EnvelopeGen {
        pub(crate) fn new(seed: u64) -> Self {
            EnvelopeGen(seed)
        }

        pub(crate) fn below(&mut self, n: usize) -> usize {
            // xorshift64*: repeatable, no dependency.
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
        }

        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            from[self.below(from.len())]
        }

        fn space(&mut self) -> &'static str {
            self.pick(&["", "", "", " ", "\n", "\t", "\r\n  "])
        }

        fn string(&mut self) -> String {
            let plain = [
                "doc.42",
                "a",
                "",
                "héllo",
                "€uro",
                "x y",
                "long run of plain text here",
            ];
            // One string in four carries an escape or a raw control character.
            let special = ["\\\"", "\\n", "\\u00e9", "\\u12", "\t", "\u{1}", "\\/"];
            let with_special = self.below(4) == 0;
            let mut out = String::from("\"");
            for _ in 0..self.below(4) {
                out.push_str(self.pick(&plain));
            }
            if with_special {
                out.push_str(self.pick(&special));
            }
            out.push('"');
            out
        }

        fn value(&mut self, depth: usize) -> String {
            let kinds = if depth > 3 { 3 } else { 5 };
            match self.below(kinds) {
                0 => self.string(),
                1 if self.below(5) == 0 => self
                    .pick(&["01", "1.", ".5", "-", "1e+", "+1", "-a", "1.5e", "0x1"])
                    .to_string(),
                1 => self
                    .pick(&[
                        "0", "-0", "12", "-3.25", "1e5", "2E-3", "6.02e+23", "-0.0e-0",
                    ])
                    .to_string(),
                2 if self.below(6) == 0 => self.pick(&["tru", "nul", "falsey"]).to_string(),
                2 => self.pick(&["true", "false", "null"]).to_string(),
                3 => {
                    let items: Vec<String> =
                        (0..self.below(4)).map(|_| self.value(depth + 1)).collect();
                    let sep = format!("{},{}", self.space(), self.space());
                    let trailing = if self.below(12) == 0 { "," } else { "" };
                    format!("[{}{}{}]", items.join(&sep), trailing, self.space())
                }
                _ => {
                    let items: Vec<String> = (0..self.below(4))
                        .map(|_| {
                            let key = self.string();
                            let (a, b) = (self.space(), self.space());
                            format!("{key}{a}:{b}{}", self.value(depth + 1))
                        })
                        .collect();
                    format!("{{{}{}}}", self.space(), items.join(","))
                }
            }
        }

        pub(crate) fn envelope(&mut self) -> String {
            self.object(false)
        }

        /// An envelope object; `ws`: a WebSocket publish (`op`, `ref`), now and then another
        /// op or none.
        pub(crate) fn object(&mut self, ws: bool) -> String {
            let mut fields: Vec<String> = Vec::new();
            if ws {
                let op = if self.below(10) == 0 {
                    self.pick(&["\"subscribe\"", "\"publ\\u0069sh\"", "7", "null"])
                } else {
                    "\"publish\""
                };
                if self.below(30) != 0 {
                    fields.push(format!("\"op\":{op}"));
                }
                if self.below(2) == 0 {
                    let reference = match self.below(6) {
                        0 => "null".to_string(),
                        1 => self.value(3),
                        2 | 3 => self.string(),
                        _ => self.pick(&["1", "-42", "3.5", "1e3", "01"]).to_string(),
                    };
                    fields.push(format!("\"ref\":{reference}"));
                }
            }
            let keys = [
                "channel",
                "type",
                "data",
                "id",
                "source",
                "correlation_id",
                "extra",
            ];
            for key in keys {
                // The required three are usually there, the rest now and then; sometimes twice.
                let wanted = match key {
                    "channel" | "type" | "data" => self.below(30) != 0,
                    "extra" => self.below(30) == 0,
                    _ => self.below(3) == 0,
                };
                let times = if wanted {
                    1 + usize::from(self.below(60) == 0)
                } else {
                    0
                };
                for _ in 0..times {
                    let value = match key {
                        "data" => self.value(0),
                        _ if self.below(8) == 0 => self.value(2),
                        "channel" | "type" => self.string(),
                        _ => {
                            if self.below(3) == 0 {
                                "null".to_string()
                            } else {
                                self.string()
                            }
                        }
                    };
                    let (a, b, c) = (self.space(), self.space(), self.space());
                    fields.push(format!("{a}\"{key}\"{b}:{c}{value}"));
                }
            }
            // Any order.
            for i in (1..fields.len()).rev() {
                let j = self.below(i + 1);
                fields.swap(i, j);
            }
            let (a, b) = (self.space(), self.space());
            format!("{a}{{{}}}{b}", fields.join(","))
        }

        /// Now and then one byte dropped or one inserted, or the text cut short.
        pub(crate) fn mutate(&mut self, text: String) -> String {
            let mut bytes = text.into_bytes();
            match self.below(12) {
                0 if !bytes.is_empty() => {
                    let at = self.below(bytes.len());
                    bytes.remove(at);
                }
                1 => {
                    let at = self.below(bytes.len() + 1);
                    let palette = b"{}[]\",:\\ 0e.-tn";
                    let b = palette[self.below(palette.len())];
                    bytes.insert(at, b);
                }
                2 if !bytes.is_empty() => {
                    let at = self.below(bytes.len());
                    bytes.truncate(at);
                }
                _ => {}
            }
            String::from_utf8(bytes).unwrap_or_default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: &str = r#"{"channel":"doc.42","type":"document.edit","data":{"op":"insert","pos":[1,-2.5e3,true,false,null],"text":"héllo wörld, a longer run of text"}}"#;

    #[test]
    fn the_common_shape_is_read_in_place() {
        let fields = scan_one(PLAIN).expect("plain envelope");
        assert_eq!(fields.channel, "doc.42");
        assert_eq!(fields.event_type, "document.edit");
        assert_eq!(
            fields.data,
            r#"{"op":"insert","pos":[1,-2.5e3,true,false,null],"text":"héllo wörld, a longer run of text"}"#
        );
        assert_eq!(
            (fields.id, fields.source, fields.correlation_id),
            (None, None, None)
        );
        // Slices of the body itself, so the caller's zero-copy `Bytes` slicing applies.
        let range = PLAIN.as_bytes().as_ptr_range();
        assert!(range.contains(&fields.data.as_ptr()));

        let full = r#" {"id":"ev-1", "source" : "sift", "correlation_id":null,
            "data" : 7 , "type":"t","channel":"c"} "#;
        let fields = scan_one(full).expect("every field, any order, whitespace");
        assert_eq!(fields.id, Some("ev-1"));
        assert_eq!(fields.source, Some("sift"));
        assert_eq!(fields.correlation_id, None);
        assert_eq!(fields.data, "7");
    }

    #[test]
    fn batches_are_read_element_by_element() {
        let body = format!("[{PLAIN}, {PLAIN}\n,{PLAIN}]");
        let items = scan_batch(&body).expect("plain batch");
        assert_eq!(items.len(), 3);
        assert!(items.iter().all(|f| f.channel == "doc.42"));
        for not_plain in [
            "[]",
            "[ ]",
            "[{}]",
            &format!("[{PLAIN},]"),
            &format!("[{PLAIN}"),
        ] {
            assert_eq!(scan_batch(not_plain), None, "{not_plain}");
        }
    }

    #[test]
    fn anything_outside_the_plain_form_is_left_to_serde() {
        let outside = [
            "",
            "{}",
            r#"{"channel":"c","type":"t"}"#,                // no data
            r#"{"channel":"c","data":1}"#,                  // no type
            r#"{"channel":"c\u0041","type":"t","data":1}"#, // an escape
            r#"{"channel":"c","type":"t","data":"a\nb"}"#,  // an escape in data
            r#"{"channel":"c","type":"t","data":1,"extra":2}"#, // an unknown key
            r#"{"channel":"c","channel":"d","type":"t","data":1}"#, // a repeated key
            r#"{"channel":"c","type":"t","data":1,"data":2}"#, // a repeated data
            r#"{"channel":"c","type":"t","data":01}"#,      // a leading zero
            r#"{"channel":"c","type":"t","data":1.}"#,      // no fraction digits
            r#"{"channel":"c","type":"t","data":-}"#,       // no digits
            r#"{"channel":"c","type":"t","data":1e}"#,      // no exponent digits
            r#"{"channel":"c","type":"t","data":[1,]}"#,    // a trailing comma
            r#"{"channel":"c","type":"t","data":{"a"}}"#,   // a key without a value
            r#"{"channel":"c","type":"t","data":tru}"#,     // a cut literal
            r#"{"channel":"c","type":"t","data":1} x"#,     // trailing bytes
            r#"{"channel":1,"type":"t","data":1}"#,         // a channel not a string
            r#"{"channel":"c","type":"t","id":5,"data":1}"#, // an id not a string
            r#"{"channel":"c","type":"t","data":"tab	inside"}"#, // a raw control character
            r#"["c","t",null,1]"#,                          // the sequence form
            r#"{"channel":"c","type":"t","data":1"#,        // cut short
        ];
        for text in outside {
            assert_eq!(scan_one(text), None, "{text}");
        }
        let deep = format!(
            r#"{{"channel":"c","type":"t","data":{}{}}}"#,
            "[".repeat(DEPTH_MAX + 1),
            "]".repeat(DEPTH_MAX + 1)
        );
        assert_eq!(scan_one(&deep), None, "deeper than DEPTH_MAX");
        let at_limit = format!(
            r#"{{"channel":"c","type":"t","data":{}{}}}"#,
            "[".repeat(DEPTH_MAX),
            "]".repeat(DEPTH_MAX)
        );
        assert!(scan_one(&at_limit).is_some(), "DEPTH_MAX deep is read");
    }

    #[test]
    fn websocket_publishes_take_op_and_ref() {
        let text = r#"{"op":"publish","ref":"r-1","channel":"doc.42","type":"t","data":[1]}"#;
        let read = scan_ws_publish(text).expect("plain publish");
        assert_eq!(
            read.reference,
            Some(r#""r-1""#),
            "the ref's text, quotes kept"
        );
        assert_eq!((read.fields.channel, read.fields.data), ("doc.42", "[1]"));
        let numbered = r#"{"ref":-7,"channel":"c","type":"t","data":{},"op":"publish"}"#;
        assert_eq!(
            scan_ws_publish(numbered).map(|r| r.reference),
            Some(Some("-7"))
        );
        assert_eq!(scan_one(text), None, "an HTTP body has no op");
        for other in [
            r#"{"op":"subscribe","channel":"c","type":"t","data":1}"#,
            r#"{"channel":"c","type":"t","data":1}"#,
            r#"{"op":"publish","channel":"c","type":"t","data":null}"#,
            r#"{"op":"publish","ref":null,"channel":"c","type":"t","data":1}"#,
            r#"{"op":"publish","ref":{"a":1},"channel":"c","type":"t","data":1}"#,
            r#"{"op":"publish","ref":1,"ref":2,"channel":"c","type":"t","data":1}"#,
            r#"{"op":"publish","since":{"epoch":"e","seq":1},"channel":"c","type":"t","data":1}"#,
        ] {
            assert_eq!(scan_ws_publish(other), None, "{other}");
        }
    }

    #[test]
    fn string_stops_find_the_first_special_byte_in_a_word() {
        for special in [b'"', b'\\', 0x00, 0x1f] {
            for at in 0..8 {
                let mut word = *b"abcdefgh";
                word[at] = special;
                // A second special byte above the first must not move the answer.
                if at < 7 {
                    word[7] = b'"';
                }
                let stops = string_stops(u64::from_le_bytes(word));
                assert_eq!(
                    (stops.trailing_zeros() / 8) as usize,
                    at,
                    "{special:#x} at {at}"
                );
            }
        }
        for plain in [
            *b"abcdefgh",
            *b" !#[]~\x7f ",
            [0xc3, 0xa9, 0xe2, 0x82, 0xac, b'z', b'0', 0xff],
        ] {
            assert_eq!(string_stops(u64::from_le_bytes(plain)), 0, "{plain:?}");
        }
    }
}
