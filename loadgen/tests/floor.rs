//! `relay-floor` as a user runs it: the binary, a small plan, its JSON; and a bad command
//! line refused with exit code 2 and a message naming the flag. The tests assert counts,
//! never timings (the figures are for docs/performance.md).

use std::process::Command;

fn floor(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_relay-floor"))
        .args(args)
        .output()
        .expect("relay-floor runs")
}

#[test]
fn a_small_fanout_ramp_reports_every_step_in_json() {
    let out = floor(&[
        "fanout",
        "--subscribers",
        "50",
        "--ramp",
        "100:200:2",
        "--step-s",
        "0.3",
        "--hold-us",
        "1000",
        "--ack-bytes",
        "150",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let steps = report["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2, "{report}");
    for (step, rate) in steps.iter().zip([100, 200]) {
        assert_eq!(step["rate"], rate);
        let published = step["published"].as_u64().unwrap();
        assert_eq!(published, rate * 3 / 10);
        assert_eq!(step["expected"].as_u64(), Some(published * 50));
        assert_eq!(step["delivered"], step["expected"]);
        assert_eq!(
            (step["lost"].as_u64(), step["corrupt"].as_u64()),
            (Some(0), Some(0))
        );
        assert!(step["latency_us"]["p99"].as_f64().unwrap() > 0.0);
        assert_eq!(step["acked"].as_u64(), Some(published));
    }
    assert_eq!(report["options"]["subscribers"], 50);
    assert_eq!(report["options"]["ack_bytes"], 150);
    assert_eq!(report["options"]["hold_us"], 1000);
}

#[test]
fn the_table_names_the_shape_and_the_best_steps() {
    let out = floor(&[
        "channels",
        "--subscribers",
        "40",
        "--channels",
        "40",
        "--rate",
        "400",
        "--duration-s",
        "0.3",
    ]);
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("40 subscribers on 40 channels"), "{table}");
    assert!(table.contains("best at p99 <= 100 ms"), "{table}");
}

#[test]
fn a_cpu_the_kernel_refuses_ends_the_run_with_exit_1() {
    let out = floor(&["latency", "--sink-cpu", "100000", "--duration-s", "0.1"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--sink-cpu 100000"), "{err}");
}

#[test]
fn bad_command_lines_exit_2_and_say_why() {
    for (args, needle) in [
        (&["fanout", "--frame-bytes", "4"][..], "--frame-bytes"),
        (&["latency", "--channels", "500"][..], "--channels 500"),
        (&["fanout", "--ramp", "10:5:2"][..], "START"),
        (&["sideways"][..], "sideways"),
    ] {
        let out = floor(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

/// `relay-floor connect` driven by `relay-loadgen connect`, as docs/performance.md runs it:
/// every handshake the generator counts is one the floor answered and closed gracefully; a
/// request it does not answer gets a 400 and the floor keeps serving.
#[test]
fn the_handshake_floor_serves_the_connect_scenario() {
    use std::io::{Read, Write};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let target = format!("127.0.0.1:{port}");
    let server = Command::new(env!("CARGO_BIN_EXE_relay-floor"))
        .args([
            "connect",
            "--listen",
            &target,
            "--duration-s",
            "4",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("relay-floor starts");
    let started = std::time::Instant::now();
    let mut bad = loop {
        match std::net::TcpStream::connect(&target) {
            Ok(s) => break s,
            Err(_) if started.elapsed() < std::time::Duration::from_secs(3) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("the floor does not listen: {e}"),
        }
    };
    bad.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("sends");
    let mut answer = String::new();
    bad.read_to_string(&mut answer).expect("reads to the close");
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");

    let generator = Command::new(env!("CARGO_BIN_EXE_relay-loadgen"))
        .args([
            "connect",
            "--concurrency",
            "2",
            "--duration-s",
            "0.5",
            "--json",
        ])
        .args(["--target", &target])
        .output()
        .expect("relay-loadgen runs");
    assert!(generator.status.success(), "{generator:?}");
    let report: serde_json::Value =
        serde_json::from_slice(&generator.stdout).expect("one JSON object");
    let handshakes = report["connect"]["handshakes"]
        .as_u64()
        .expect("handshakes");
    assert!(handshakes > 0, "{report}");
    assert_eq!(report["connect"]["failures"], 0, "{report}");

    let out = server.wait_with_output().expect("the floor ends by itself");
    assert!(out.status.success(), "{out:?}");
    let floor: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(floor["handshakes"].as_u64(), Some(handshakes), "{floor}");
    assert_eq!(
        floor["closed_gracefully"].as_u64(),
        Some(handshakes),
        "{floor}"
    );
    assert_eq!(floor["refused"], 1, "{floor}");
    assert!(
        floor["cpu_us_per_handshake"]
            .as_f64()
            .is_some_and(|us| us > 0.0),
        "{floor}"
    );
}
