//! The node tuning scripts (`tuning/`): each runs on this machine, reports every check in its
//! fixed format, refuses bad usage with exit status 2, and changes nothing without `--apply`.

use std::path::PathBuf;
use std::process::Command;

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tuning")
        .join(name)
}

fn run(name: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("bash")
        .arg(script(name))
        .args(args)
        .output()
        .expect("run bash");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_node_reports_every_check() {
    // Ten connections fit any machine's descriptor limit, so only FAIL-free runs exit 0.
    let (code, out, err) = run("check-node.sh", &["--connections", "10"]);
    let lines: Vec<&str> = out.lines().collect();
    for line in &lines {
        let status = line.split_whitespace().next().unwrap_or("");
        assert!(
            ["PASS", "WARN", "FAIL"].contains(&status),
            "every line starts with a status: {line:?}"
        );
    }
    for check in [
        "open files",
        "fs.nr_open",
        "net.core.somaxconn",
        "io_uring",
        "memory",
        "swap",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(check)),
            "no {check:?} line in:\n{out}"
        );
    }
    let fails = lines.iter().filter(|l| l.starts_with("FAIL")).count();
    assert_eq!(
        code,
        i32::from(fails > 0),
        "exit status follows the FAIL lines:\n{out}{err}"
    );

    // More connections than this process may open files: the descriptor check fails.
    let (code, out, _) = run("check-node.sh", &["--connections", "100000000"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("open files")),
        "{out}"
    );
}

#[test]
fn check_node_refuses_bad_usage() {
    for args in [
        &["--connections", "many"][..],
        &["--bogus"][..],
        &["--pid", "999999999"][..],
    ] {
        let (code, _, err) = run("check-node.sh", args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(!err.trim().is_empty(), "{args:?} says what is wrong");
    }
    let (code, out, _) = run("check-node.sh", &["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("Usage"), "{out}");
}

#[test]
fn irq_affinity_only_prints_without_apply() {
    let (code, _, err) = run("irq-affinity.sh", &[]);
    assert_eq!(code, 2, "an interface is required: {err}");
    let (code, _, err) = run("irq-affinity.sh", &["no-such-iface0"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no interface"), "{err}");
    // The loopback interface exists everywhere; without --apply nothing is written.
    let (code, out, err) = run("irq-affinity.sh", &["lo", "--cpus", "0"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        !out.contains("wrote"),
        "nothing written without --apply: {out}"
    );
}
