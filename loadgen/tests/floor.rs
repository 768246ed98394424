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
