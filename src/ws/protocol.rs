//! The JSON protocol of a WebSocket connection: client ops in, replies out (API.md section 3).
//!
//! Owns parsing and validating one client message, checking it against the connection's
//! principal and limits, calling the bus through the shard, and building the reply frames
//! (`ref` echoed exactly as sent). Must never: answer without the `ref` the client gave (when
//! the message parsed far enough to have one), or hold a `RefCell` borrow across an `.await`.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{codec, WsConn};
use crate::auth::Grants;
use crate::bus::{Member, Since};
use crate::envelope;
use crate::http::codec::{json_escape_into, push_u64};
use crate::metrics::ErrorKind;
use crate::names;
use crate::shard::{BusError, PublishTicket, Shard};

/// Error codes of API.md section 3.
pub mod code {
    pub const BAD_REQUEST: &str = "bad_request";
    pub const UNKNOWN_OP: &str = "unknown_op";
    pub const FORBIDDEN: &str = "forbidden";
    pub const RATE_LIMITED: &str = "rate_limited";
    pub const LIMIT_EXCEEDED: &str = "limit_exceeded";
    pub const INTERNAL: &str = "internal";
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinceIn {
    pub epoch: String,
    pub seq: u64,
}

/// Every field any op takes; each op checks the ones it needs. Public for the fuzz target
/// that checks the publish fast path (`envelope::scan_ws_publish`) against it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request<'a> {
    #[serde(borrow)]
    pub op: Cow<'a, str>,
    #[serde(rename = "ref", default, borrow)]
    pub reference: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pub channel: Option<Cow<'a, str>>,
    #[serde(default)]
    pub since: Option<SinceIn>,
    #[serde(rename = "type", default, borrow)]
    pub event_type: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub data: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pub id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub source: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub correlation_id: Option<Cow<'a, str>>,
}

/// A publish's fields, as the fast path (`envelope`) or a parsed [`Request`] has them.
#[derive(Debug, PartialEq, Eq)]
struct PublishFields<'a> {
    channel: Option<&'a str>,
    event_type: Option<&'a str>,
    data: Option<&'a str>,
    id: Option<&'a str>,
    source: Option<&'a str>,
    correlation_id: Option<&'a str>,
}

impl<'a> PublishFields<'a> {
    fn of(request: &'a Request<'a>) -> Self {
        PublishFields {
            channel: request.channel.as_deref(),
            event_type: request.event_type.as_deref(),
            data: request.data.map(RawValue::get),
            id: request.id.as_deref(),
            source: request.source.as_deref(),
            correlation_id: request.correlation_id.as_deref(),
        }
    }
}

impl<'a> From<envelope::Fields<'a>> for PublishFields<'a> {
    fn from(f: envelope::Fields<'a>) -> Self {
        PublishFields {
            channel: Some(f.channel),
            event_type: Some(f.event_type),
            data: Some(f.data),
            id: f.id,
            source: f.source,
            correlation_id: f.correlation_id,
        }
    }
}

/// A publish in the plain form, read by the fast path (`envelope`): its fields and `ref`.
fn plain_publish(source: &str) -> Option<(PublishFields<'_>, Option<&RawValue>)> {
    let fast = envelope::scan_ws_publish(source)?;
    // The fast path read `ref` as a string or a number, so it is JSON and valid.
    let reference = fast.reference.map(serde_json::from_str).transpose().ok()?;
    Some((PublishFields::from(fast.fields), reference))
}

/// The request's channel, present and a valid name.
fn checked_channel(channel: Option<&str>) -> Result<&str, Refusal> {
    let channel = channel.ok_or_else(|| refuse(code::BAD_REQUEST, "channel is required"))?;
    names::validate_channel(channel).map_err(|e| refuse(code::BAD_REQUEST, e.to_string()))?;
    Ok(channel)
}

/// Just the `ref`, from a message that failed to parse as a request.
#[derive(Deserialize)]
struct RefOnly<'a> {
    #[serde(rename = "ref", default, borrow)]
    reference: Option<&'a RawValue>,
}

/// One connection's protocol state.
pub struct Session {
    shard: Rc<Shard>,
    conn: Rc<WsConn>,
    grants: Grants,
    /// Publishes on their way to other shards, oldest first, at most
    /// `limits.max_publishes_in_flight`. Every other reply waits until these are answered,
    /// so replies leave in the order the client sent its requests.
    in_flight: VecDeque<InFlight>,
}

/// A publish started and not yet answered.
struct InFlight {
    ticket: PublishTicket,
    reference: Option<Box<RawValue>>,
    started: std::time::Instant,
}

/// A reply error: code and message.
struct Refusal(&'static str, String);

fn refuse(code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal(code, message.into())
}

impl Session {
    pub fn new(shard: Rc<Shard>, conn: Rc<WsConn>, grants: Grants) -> Session {
        Session {
            shard,
            conn,
            grants,
            in_flight: VecDeque::new(),
        }
    }

    pub fn shard(&self) -> &Rc<Shard> {
        &self.shard
    }

    pub fn conn(&self) -> &Rc<WsConn> {
        &self.conn
    }

    /// Handles one text message (valid UTF-8, at most `limits.max_frame_bytes`). A publish
    /// another shard must sequence may still be under way when this returns; the caller
    /// [`settles`](Session::settle) before it waits for more input. `arrived` is when the read
    /// that carried it completed: a publish is timed, and its event stamped, from then.
    pub async fn handle(&mut self, text: Bytes, arrived: std::time::Instant) {
        let Ok(source) = std::str::from_utf8(&text) else {
            self.settle().await;
            return self.error(None, code::BAD_REQUEST, "message is not UTF-8");
        };
        // With nothing in flight, [`Session::publish_at_once`] (which the reader calls first)
        // has already found this is not a plain publish; serde_json reads a plain one the same
        // way in any case.
        if !self.in_flight.is_empty() {
            if let Some((fields, reference)) = plain_publish(source) {
                return self.publish(fields, reference, &text, arrived).await;
            }
        }
        let request: Request = match serde_json::from_str(source) {
            Ok(r) => r,
            Err(e) => {
                // A message that is JSON but not a request still gets its ref back.
                let reference = serde_json::from_str::<RefOnly>(source)
                    .ok()
                    .and_then(|r| r.reference)
                    .filter(|r| ref_is_valid(r));
                let message = if e.is_syntax() || e.is_eof() {
                    format!("message is not valid JSON: {e}")
                } else {
                    format!("invalid request: {e}")
                };
                self.settle().await;
                return self.error(reference, code::BAD_REQUEST, &message);
            }
        };
        let reference = request.reference;
        if let Some(r) = reference {
            if !ref_is_valid(r) {
                self.settle().await;
                return self.error(None, code::BAD_REQUEST, "ref must be a string or a number");
            }
        }
        if &*request.op == "publish" {
            let fields = PublishFields::of(&request);
            return self.publish(fields, reference, &text, arrived).await;
        }
        // Anything else sees every earlier publish answered, and replies after them.
        self.settle().await;
        let outcome = match &*request.op {
            "subscribe" => self.subscribe(&request).await,
            "unsubscribe" => self.unsubscribe(&request),
            "presence" => self.presence(&request).await,
            "ping" => {
                let mut reply = Reply::new("pong", reference);
                Ok(reply.finish())
            }
            other => Err(refuse(
                code::UNKNOWN_OP,
                format!(
                    "unknown op {other:?} (expected subscribe, unsubscribe, publish, presence, ping)"
                ),
            )),
        };
        self.send(outcome, reference);
    }

    /// A publish request: started now, answered now when nothing is in flight before it and
    /// its owner is this shard, else queued behind the publishes in flight.
    async fn publish(
        &mut self,
        fields: PublishFields<'_>,
        reference: Option<&RawValue>,
        text: &Bytes,
        arrived: std::time::Instant,
    ) {
        if let Err(refusal) = self.begin_publish(fields, reference, text, arrived) {
            self.settle().await;
            return self.send(Err(refusal), reference);
        }
        let max = self.shard.config().limits.max_publishes_in_flight;
        while self.in_flight.len() > max {
            self.answer_oldest().await;
        }
    }

    /// A publish in the plain form handled without waiting, when nothing is in flight before
    /// it: it is answered now, or it becomes the one publish in flight (within any
    /// `limits.max_publishes_in_flight`, which is at least 1). False, with nothing done, for
    /// any other message, which goes to [`Session::handle`]. The connection's reader calls
    /// this first, so that the usual publish costs it no future of its own (`handle`'s is
    /// boxed, a read loop's state being kept small).
    pub fn publish_at_once(&mut self, text: &Bytes, arrived: std::time::Instant) -> bool {
        if !self.in_flight.is_empty() {
            return false;
        }
        let Some((fields, reference)) = std::str::from_utf8(text).ok().and_then(plain_publish)
        else {
            return false;
        };
        self.shard.stats.ws_messages_received.inc();
        // Nothing is in flight, so a refusal has nothing to wait for.
        if let Err(refusal) = self.begin_publish(fields, reference, text, arrived) {
            self.send(Err(refusal), reference);
        }
        true
    }

    /// Starts a publish: answered now when nothing is in flight before it and every owner
    /// answered already, else queued in flight. `Err` when it was refused before it started.
    fn begin_publish(
        &mut self,
        fields: PublishFields<'_>,
        reference: Option<&RawValue>,
        text: &Bytes,
        arrived: std::time::Instant,
    ) -> Result<(), Refusal> {
        let ticket = self.start_publish(fields, text, arrived)?;
        // Answered here and now only when no earlier publish is still waiting.
        let ticket = if self.in_flight.is_empty() {
            match ticket.try_finish() {
                Ok(answer) => {
                    let outcome = self.published(answer, reference, arrived);
                    self.send(outcome, reference);
                    return Ok(());
                }
                Err(ticket) => ticket,
            }
        } else {
            ticket
        };
        self.in_flight.push_back(InFlight {
            ticket,
            reference: reference.map(ToOwned::to_owned),
            started: arrived,
        });
        Ok(())
    }

    /// Waits for every publish under way and sends their replies, in order.
    pub async fn settle(&mut self) {
        while !self.in_flight.is_empty() {
            self.answer_oldest().await;
        }
    }

    async fn answer_oldest(&mut self) {
        let Some(entry) = self.in_flight.pop_front() else {
            return;
        };
        let reference = entry.reference.as_deref();
        let outcome = self.published(entry.ticket.finish().await, reference, entry.started);
        self.send(outcome, reference);
    }

    fn send(&self, outcome: Result<Option<Bytes>, Refusal>, reference: Option<&RawValue>) {
        match outcome {
            Ok(Some(frame)) => self.conn.send_frame(frame),
            Ok(None) => {}
            Err(Refusal(code, message)) => self.error(reference, code, &message),
        }
    }

    fn error(&self, reference: Option<&RawValue>, code: &str, message: &str) {
        if code == code::FORBIDDEN {
            self.shard.stats.auth_failures.inc();
        } else if code == code::BAD_REQUEST {
            self.shard.stats.error(ErrorKind::BadRequest);
        }
        let mut reply = Reply::new("error", reference);
        reply.str_field("code", code);
        reply.str_field("message", message);
        if let Some(frame) = reply.finish() {
            self.conn.send_frame(frame);
        }
    }

    async fn subscribe(&mut self, request: &Request<'_>) -> Result<Option<Bytes>, Refusal> {
        let channel = checked_channel(request.channel.as_deref())?;
        if !self.grants.may_subscribe(channel) {
            return Err(refuse(
                code::FORBIDDEN,
                format!("your token does not allow subscribing to {channel}"),
            ));
        }
        if self.conn.is_subscribed(channel) {
            return Err(refuse(
                code::BAD_REQUEST,
                format!("already subscribed to {channel}"),
            ));
        }
        let max = self.shard.config().limits.max_subscriptions_per_connection;
        if self.conn.subscription_count() >= max {
            return Err(refuse(
                code::LIMIT_EXCEEDED,
                format!("a connection may hold {max} subscriptions (limits.max_subscriptions_per_connection)"),
            ));
        }
        let since = request.since.as_ref().map(|s| Since {
            epoch: s.epoch.clone(),
            seq: s.seq,
        });
        let channel: Arc<str> = Arc::from(channel);
        self.conn.begin_subscription(&channel);
        let member = Some((self.conn.user.clone(), self.conn.conn_id.clone()));
        let sink: Rc<dyn crate::bus::Sink> = self.conn.clone();
        let answer = match self
            .shard
            .subscribe(&channel, self.conn_sink_id(), sink, since.clone(), member)
            .await
        {
            Ok(answer) => answer,
            Err(e) => {
                self.conn.end_subscription(&channel);
                self.shard.unsubscribe(
                    &channel,
                    self.conn_sink_id(),
                    Some(self.conn.conn_id.clone()),
                );
                return Err(bus_refusal(e));
            }
        };
        let mut reply = Reply::new("subscribed", request.reference);
        reply.str_field("channel", &channel);
        reply.str_field("epoch", &answer.epoch);
        reply.num_field("seq", answer.seq);
        reply.raw_field("recovered", if answer.recovered { "true" } else { "false" });
        if let Some(frame) = reply.finish() {
            let max_replayed = super::max_replayed(self.shard.config());
            self.conn
                .recovered(&channel, frame, &answer, since.as_ref(), max_replayed);
        }
        Ok(None)
    }

    fn conn_sink_id(&self) -> u64 {
        self.conn.sink_id()
    }

    fn unsubscribe(&mut self, request: &Request<'_>) -> Result<Option<Bytes>, Refusal> {
        let channel = checked_channel(request.channel.as_deref())?;
        // Messages are handled one at a time, so no subscribe is half done here.
        let Some(channel) = self.conn.end_subscription(channel) else {
            return Err(refuse(
                code::BAD_REQUEST,
                format!("not subscribed to {channel}"),
            ));
        };
        self.shard.unsubscribe(
            &channel,
            self.conn_sink_id(),
            Some(self.conn.conn_id.clone()),
        );
        let mut reply = Reply::new("unsubscribed", request.reference);
        reply.str_field("channel", &channel);
        Ok(reply.finish())
    }

    /// Checks a publish and starts it: sequenced now when this shard owns the channel,
    /// otherwise on its way to the owner.
    fn start_publish(
        &mut self,
        fields: PublishFields<'_>,
        text: &Bytes,
        accepted_at: std::time::Instant,
    ) -> Result<PublishTicket, Refusal> {
        let channel = checked_channel(fields.channel)?;
        if !self.grants.may_publish(channel) {
            return Err(refuse(
                code::FORBIDDEN,
                format!("your token does not allow publishing to {channel}"),
            ));
        }
        let key = || format!("user:{}", self.conn.user);
        if self.shard.proxy.check_publish(key).is_err() {
            self.shard.stats.rate_limited.inc();
            return Err(refuse(
                code::RATE_LIMITED,
                "publish rate limit reached (rate_limit.publish_per_s); slow down",
            ));
        }
        let event_type = fields
            .event_type
            .ok_or_else(|| refuse(code::BAD_REQUEST, "type is required"))?;
        let data = fields
            .data
            .ok_or_else(|| refuse(code::BAD_REQUEST, "data is required"))?;
        let fields = envelope::Fields {
            channel,
            event_type,
            id: fields.id,
            data,
            source: fields.source,
            correlation_id: fields.correlation_id,
        };
        let draft =
            crate::api::make_draft(text, fields).map_err(|e| refuse(code::BAD_REQUEST, e))?;
        self.shard
            .publish_start(smallvec::smallvec![draft], accepted_at)
            .map_err(bus_refusal)
    }

    /// The reply to a finished publish of one draft.
    fn published(
        &self,
        answer: Result<crate::shard::PublishOutcomes, BusError>,
        reference: Option<&RawValue>,
        started: std::time::Instant,
    ) -> Result<Option<Bytes>, Refusal> {
        let p = match answer.map_err(bus_refusal)?.into_iter().next() {
            Some(outcome) => outcome.map_err(bus_refusal)?,
            None => return Err(refuse(code::INTERNAL, "the bus gave no answer")),
        };
        self.shard.stats.publish_duration[crate::metrics::Transport::Ws as usize]
            .record(started.elapsed());
        let mut reply = Reply::new("published", reference);
        reply.str_field("channel", &p.channel);
        reply.num_field("seq", p.seq);
        reply.str_field("id", p.id());
        reply.raw_field("duplicate", if p.duplicate { "true" } else { "false" });
        Ok(reply.finish())
    }

    async fn presence(&mut self, request: &Request<'_>) -> Result<Option<Bytes>, Refusal> {
        let channel = checked_channel(request.channel.as_deref())?;
        if !self.grants.may_subscribe(channel) {
            return Err(refuse(
                code::FORBIDDEN,
                format!("your token does not allow subscribing to {channel}"),
            ));
        }
        let members = self
            .shard
            .presence(Arc::from(channel))
            .await
            .map_err(bus_refusal)?
            .ok_or_else(|| {
                refuse(
                    code::BAD_REQUEST,
                    format!("presence is turned off for {channel} by a [[channels]] rule"),
                )
            })?;
        let mut reply = Reply::new("presence", request.reference);
        reply.str_field("channel", channel);
        reply.members(&members);
        Ok(reply.finish())
    }

    /// Unsubscribes everything (the connection is ending).
    pub fn unsubscribe_all(&mut self) {
        for channel in self.conn.end_all_subscriptions() {
            self.shard.unsubscribe(
                &channel,
                self.conn_sink_id(),
                Some(self.conn.conn_id.clone()),
            );
        }
    }
}

fn bus_refusal(e: BusError) -> Refusal {
    match e {
        BusError::Congested { .. } => refuse(code::RATE_LIMITED, e.to_string()),
        BusError::Unavailable => refuse(code::INTERNAL, e.to_string()),
    }
}

/// A `ref` is echoed verbatim, so it must be a JSON string or number.
fn ref_is_valid(raw: &RawValue) -> bool {
    matches!(
        raw.get().as_bytes().first(),
        Some(b'"' | b'-' | b'0'..=b'9')
    )
}

/// Builds `{"op":...,"ref":...,...}` as one text frame.
pub struct Reply {
    json: Vec<u8>,
}

impl Reply {
    pub fn new(op: &str, reference: Option<&RawValue>) -> Reply {
        let mut json = Vec::with_capacity(128);
        json.extend_from_slice(b"{\"op\":\"");
        json.extend_from_slice(op.as_bytes());
        json.push(b'"');
        if let Some(r) = reference {
            json.extend_from_slice(b",\"ref\":");
            json.extend_from_slice(r.get().as_bytes());
        }
        Reply { json }
    }

    fn key(&mut self, key: &str) {
        self.json.extend_from_slice(b",\"");
        self.json.extend_from_slice(key.as_bytes());
        self.json.extend_from_slice(b"\":");
    }

    pub fn str_field(&mut self, key: &str, value: &str) {
        self.key(key);
        self.json.push(b'"');
        json_escape_into(&mut self.json, value);
        self.json.push(b'"');
    }

    pub fn num_field(&mut self, key: &str, value: u64) {
        self.key(key);
        push_u64(&mut self.json, value);
    }

    pub fn raw_field(&mut self, key: &str, raw: &str) {
        self.key(key);
        self.json.extend_from_slice(raw.as_bytes());
    }

    fn members(&mut self, members: &[Member]) {
        self.key("members");
        self.json.push(b'[');
        for (i, m) in members.iter().enumerate() {
            if i > 0 {
                self.json.push(b',');
            }
            self.json.extend_from_slice(b"{\"user\":\"");
            json_escape_into(&mut self.json, &m.user);
            self.json.extend_from_slice(b"\",\"conn\":\"");
            json_escape_into(&mut self.json, &m.conn);
            self.json.extend_from_slice(b"\",\"since\":");
            push_u64(&mut self.json, m.since_ms);
            self.json.push(b'}');
        }
        self.json.push(b']');
    }

    /// The finished frame (`Option` so call sites read as "maybe a reply").
    pub fn finish(&mut self) -> Option<Bytes> {
        self.json.push(b'}');
        Some(codec::text_frame(&self.json))
    }
}

/// `{"op":"gap","channel","from_seq","to_seq"}`: events the slow-consumer policy dropped.
pub fn gap_frame(channel: &str, from_seq: u64, to_seq: u64) -> Bytes {
    let mut reply = Reply::new("gap", None);
    reply.str_field("channel", channel);
    reply.num_field("from_seq", from_seq);
    reply.num_field("to_seq", to_seq);
    reply.finish().unwrap_or_default()
}

/// Appends the `welcome` frame.
pub fn write_welcome(out: &mut Vec<u8>, conn_id: &str, heartbeat_ms: u64) {
    let mut reply = Reply::new("welcome", None);
    reply.str_field("conn", conn_id);
    reply.num_field("heartbeat_ms", heartbeat_ms);
    reply.json.push(b'}');
    codec::write_text(out, &reply.json);
}

/// The members list as the HTTP presence endpoint returns it.
pub fn presence_json(channel: &str, members: &[Member]) -> Vec<u8> {
    let mut reply = Reply {
        json: Vec::with_capacity(64 + members.len() * 64),
    };
    reply.json.push(b'{');
    reply.json.extend_from_slice(b"\"channel\":\"");
    json_escape_into(&mut reply.json, channel);
    reply.json.push(b'"');
    reply.members(members);
    reply.json.push(b'}');
    reply.json
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_publish_fast_path_reads_only_what_serde_reads_the_same() {
        use envelope::generated::{tally, EnvelopeGen};
        let mut gen = EnvelopeGen::new(0xfeed_0042_5eed_0007);
        let message = |gen: &mut EnvelopeGen| gen.object(true);
        let (fast_hits, serde_only) = tally(&mut gen, 40_000, message, |text| {
            let slow = serde_json::from_str::<Request>(text);
            let fast = envelope::scan_ws_publish(text);
            if let (Some(fast), Ok(slow)) = (&fast, &slow) {
                assert_eq!(&*slow.op, "publish", "{text}");
                assert!(slow.since.is_none(), "{text}");
                assert_eq!(fast.reference, slow.reference.map(RawValue::get), "{text}");
                assert!(slow.reference.is_none_or(ref_is_valid), "{text}");
                let read = PublishFields::from(fast.fields);
                assert_eq!(read, PublishFields::of(slow), "{text}");
            }
            (fast.is_some(), slow.map(drop).map_err(|e| e.to_string()))
        });
        // Both sides of the fence are exercised.
        assert!(fast_hits > 3_000, "fast path taken {fast_hits} times");
        assert!(serde_only > 1_000, "serde-only forms {serde_only}");
    }

    fn payload(frame: &Bytes) -> serde_json::Value {
        let len = (frame[1] & 0x7f) as usize;
        assert!(len < 126, "test replies are short");
        serde_json::from_slice(&frame[2..2 + len]).unwrap()
    }

    #[test]
    fn replies_echo_ref_exactly() {
        for raw in [r#""abc""#, "42", "-1.5e3"] {
            let r: &RawValue = serde_json::from_str(raw).unwrap();
            assert!(ref_is_valid(r));
            let mut reply = Reply::new("pong", Some(r));
            let frame = reply.finish().unwrap();
            let text = std::str::from_utf8(&frame[2..]).unwrap();
            assert_eq!(text, format!(r#"{{"op":"pong","ref":{raw}}}"#));
        }
        for raw in ["{}", "[1]", "true", "null"] {
            let r: &RawValue = serde_json::from_str(raw).unwrap();
            assert!(!ref_is_valid(r), "{raw}");
        }
    }

    #[test]
    fn gap_and_welcome_frames() {
        let v = payload(&gap_frame("doc.1", 3, 9));
        assert_eq!(v["op"], "gap");
        assert_eq!(
            (v["from_seq"].as_u64(), v["to_seq"].as_u64()),
            (Some(3), Some(9))
        );
        let mut out = Vec::new();
        write_welcome(&mut out, "1a", 25000);
        let v = payload(&Bytes::from(out));
        assert_eq!(v["conn"], "1a");
        assert_eq!(v["heartbeat_ms"], 25000);
    }

    #[test]
    fn presence_json_lists_members() {
        let members = vec![Member {
            user: Arc::from("al\"ice"),
            conn: Arc::from("c1"),
            since_ms: 7,
        }];
        let v: serde_json::Value =
            serde_json::from_slice(&presence_json("room", &members)).unwrap();
        assert_eq!(v["channel"], "room");
        assert_eq!(v["members"][0]["user"], "al\"ice");
        assert_eq!(v["members"][0]["since"], 7);
    }
}
