//! Black-box tests of webhooks (API.md section 5): matching events are POSTed as JSON batches
//! to a subsystem instance at least once, with an idempotency key, retried with backoff (on
//! another instance when there is one), and dropped only after the last attempt, counted.

mod common;

use std::time::{Duration, Instant};

use common::upstream::{Behaviour, Upstream};
use common::*;
use serde_json::Value;

both_drivers!(
    delivered_at_least_once_with_the_same_key,
    retried_on_another_instance,
    dropped_after_the_last_attempt_and_counted,
);

fn config(instances: &[(&str, &Upstream)], webhooks: &str) -> String {
    let mut toml = format!("[health]\ninterval_ms = 60000\n[webhooks]\n{webhooks}\n");
    for (instance, upstream) in instances {
        toml.push_str(&format!(
            "[[subsystems]]\nname = \"sift\"\ninstance = \"{instance}\"\nurl = \"{}\"\n\
             [[subsystems.subscriptions]]\ntypes = [\"document.*\"]\nchannels = [\"doc.*\"]\npath = \"/events\"\n",
            upstream.url()
        ));
    }
    toml
}

fn posts(upstream: &Upstream) -> Vec<common::upstream::Recorded> {
    upstream
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.target == "/events")
        .collect()
}

fn wait_for(what: &str, bound: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn delivered_at_least_once_with_the_same_key(driver: &str) {
    let upstream = Upstream::start(
        "sift-1",
        Behaviour::FailFirst {
            failures: 1,
            status: 500,
        },
    );
    let server = Server::start_with_config(
        driver,
        &config(&[("sift-1", &upstream)], "backoff_initial_ms = 50"),
    );
    let resp = server.post_json(
        "/api/v1/relay/events",
        r#"[{"channel":"doc.1","type":"document.edit","data":{"n":1}},
            {"channel":"chat.1","type":"document.edit","data":{"n":2}},
            {"channel":"doc.2","type":"other.thing","data":{"n":3}},
            {"channel":"doc.1","type":"document.edit","data":{"n":4}}]"#,
    );
    assert_eq!(resp.status, 202, "publish: {resp}");
    wait_for(
        "a successful webhook delivery",
        Duration::from_secs(10),
        || posts(&upstream).len() >= 2,
    );
    let posts = posts(&upstream);
    let key = posts[0]
        .header("idempotency-key")
        .expect("an Idempotency-Key on the first attempt");
    assert_eq!(
        posts[1].header("idempotency-key"),
        Some(key),
        "a redelivered batch keeps its key"
    );
    assert_eq!(posts[0].header("x-relay-delivery-attempt"), Some("1"));
    assert_eq!(posts[1].header("x-relay-delivery-attempt"), Some("2"));
    assert!(
        posts[1]
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "JSON body"
    );
    let batch: Value = serde_json::from_slice(&posts[1].body).expect("a JSON array");
    let events = batch.as_array().expect("an array of envelopes");
    let seen: Vec<(String, u64)> = events
        .iter()
        .map(|e| {
            (
                e["channel"].as_str().unwrap_or("").to_string(),
                e["seq"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![("doc.1".to_string(), 1), ("doc.1".to_string(), 2)],
        "only events whose type and channel match, in order"
    );
    assert!(
        events.iter().all(|e| e["id"].is_string()),
        "every envelope carries its id"
    );
    wait_for("the delivered counter", Duration::from_secs(5), || {
        server.metric_sum("relay_webhook_events_total{result=\"delivered\"}") >= 2.0
    });
    assert!(server.metric_sum("relay_webhook_attempts_failed_total") >= 1.0);
    assert_eq!(server.get("/healthz").status, 200, "the relay still serves");
}

fn retried_on_another_instance(driver: &str) {
    let broken = Upstream::start(
        "sift-broken",
        Behaviour::Fixed {
            status: 503,
            headers: Vec::new(),
            body: b"{}".to_vec(),
        },
    );
    let good = Upstream::start("sift-good", Behaviour::Normal);
    let server = Server::start_with_config(
        driver,
        &config(
            &[("sift-broken", &broken), ("sift-good", &good)],
            "backoff_initial_ms = 20\nmax_attempts = 5",
        ),
    );
    for n in 0..5 {
        let resp = server.post_json(
            "/api/v1/relay/events",
            &format!(r#"{{"channel":"doc.{n}","type":"document.edit","data":{n}}}"#),
        );
        assert_eq!(resp.status, 202, "publish: {resp}");
    }
    wait_for(
        "every event at the good instance",
        Duration::from_secs(10),
        || {
            let delivered: usize = posts(&good)
                .iter()
                .filter_map(|p| serde_json::from_slice::<Value>(&p.body).ok())
                .map(|v| v.as_array().map_or(0, |a| a.len()))
                .sum();
            delivered >= 5
        },
    );
    for post in posts(&broken) {
        let key = post.header("idempotency-key").expect("key");
        assert!(
            posts(&good)
                .iter()
                .any(|g| g.header("idempotency-key") == Some(key)),
            "a batch that failed on the broken instance was redelivered to the good one"
        );
    }
}

fn dropped_after_the_last_attempt_and_counted(driver: &str) {
    let upstream = Upstream::start(
        "sift-down",
        Behaviour::Fixed {
            status: 500,
            headers: Vec::new(),
            body: Vec::new(),
        },
    );
    let server = Server::start_with_config(
        driver,
        &config(
            &[("sift-down", &upstream)],
            "backoff_initial_ms = 10\nbackoff_max_ms = 20\nmax_attempts = 3",
        ),
    );
    let resp = server.post_json(
        "/api/v1/relay/events",
        r#"{"channel":"doc.9","type":"document.edit","data":null}"#,
    );
    assert_eq!(resp.status, 202);
    wait_for("the dropped counter", Duration::from_secs(10), || {
        server.metric_sum("relay_webhook_events_total{result=\"dropped_attempts\"}") >= 1.0
    });
    assert_eq!(posts(&upstream).len(), 3, "exactly max_attempts attempts");
    assert_eq!(server.metric_sum("relay_webhook_queue_events"), 0.0);
}
