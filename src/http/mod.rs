//! HTTP/1.1: the pure codec ([`codec`]) and the per-connection loop ([`conn`]).
//!
//! The codec never does I/O; the loop never parses by hand. Routing and handlers live in
//! `api`, which the loop calls with a complete request.

pub mod client;
pub mod codec;
pub mod conn;

/// A complete response a handler returns.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Names are static for relay's own responses and owned for an upstream's.
    pub headers: Vec<(Cow<'static, str>, String)>,
}

use std::borrow::Cow;

pub const JSON: &str = "application/json";

impl Response {
    pub fn json(status: u16, body: Vec<u8>) -> Response {
        Response {
            status,
            content_type: JSON,
            body,
            headers: Vec::new(),
        }
    }

    /// The error body of API.md section 2: `{"error":{"code","message"}}`.
    pub fn error(status: u16, code: &str, message: &str) -> Response {
        let mut body = Vec::with_capacity(48 + message.len());
        codec::write_error_json(&mut body, code, message);
        Response::json(status, body)
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((Cow::Borrowed(name), value.into()));
        self
    }
}
