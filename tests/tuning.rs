//! The operations scripts: the node tuning scripts (`tuning/`) each run on this machine, report
//! every check in their fixed format, refuse bad usage with exit status 2, and change nothing
//! without `--apply`; `deploy/pgo-build.sh` refuses bad usage before building anything, and its
//! training steps are arguments relay-loadgen accepts.

use std::path::PathBuf;
use std::process::Command;

/// Runs the script at `path` (relative to the repository root) with bash.
fn run(path: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("bash")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path))
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
    let (code, out, err) = run("tuning/check-node.sh", &["--connections", "10"]);
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
    let (code, out, _) = run("tuning/check-node.sh", &["--connections", "100000000"]);
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
        let (code, _, err) = run("tuning/check-node.sh", args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(!err.trim().is_empty(), "{args:?} says what is wrong");
    }
    let (code, out, _) = run("tuning/check-node.sh", &["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("Usage"), "{out}");
}

#[test]
fn irq_affinity_only_prints_without_apply() {
    let (code, _, err) = run("tuning/irq-affinity.sh", &[]);
    assert_eq!(code, 2, "an interface is required: {err}");
    let (code, _, err) = run("tuning/irq-affinity.sh", &["no-such-iface0"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no interface"), "{err}");
    // The loopback interface exists everywhere; without --apply nothing is written.
    let (code, out, err) = run("tuning/irq-affinity.sh", &["lo", "--cpus", "0"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        !out.contains("wrote"),
        "nothing written without --apply: {out}"
    );
}

#[test]
fn pgo_build_refuses_bad_usage_before_building() {
    for args in [
        &["--bogus"][..],
        &["--listen", "0.0.0.0:8004"][..],
        &["--listen", "127.0.0.1"][..],
        &["--shards", "two"][..],
        &["--out"][..],
    ] {
        let (code, out, err) = run("deploy/pgo-build.sh", args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(!err.trim().is_empty(), "{args:?} says what is wrong");
        assert!(!out.contains("== 1/4"), "{args:?} built nothing: {out}");
    }
    let (code, out, _) = run("deploy/pgo-build.sh", &["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("Usage") && out.contains("llvm-tools"), "{out}");
}

#[test]
fn pgo_build_trains_with_arguments_the_loadgen_accepts() {
    use clap::Parser;
    let (code, out, err) = run("deploy/pgo-build.sh", &["--print-scenarios"]);
    assert_eq!(code, 0, "{err}");
    let steps: Vec<&str> = out.lines().collect();
    // Every scenario but `idle` (which publishes nothing) is trained.
    for scenario in ["channels", "latency", "fanout", "ingest", "sse", "connect"] {
        assert!(
            steps.iter().any(|s| s.starts_with(scenario)),
            "{scenario} is trained: {steps:?}"
        );
    }
    for step in steps {
        let argv = std::iter::once("relay-loadgen")
            .chain(step.split_whitespace())
            .chain(["--target", "127.0.0.1:18004", "-q"]);
        if let Err(e) = relay_loadgen::cli::Cli::try_parse_from(argv) {
            panic!("relay-loadgen refuses the training step '{step}': {e}");
        }
    }
}
