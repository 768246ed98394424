//! The operations scripts: the node tuning scripts (`tuning/`) each run on this machine, report
//! every check in their fixed format, refuse bad usage with exit status 2, and change nothing
//! without `--apply`; `deploy/pgo-build.sh` refuses bad usage before building anything, its
//! training steps are arguments relay-loadgen accepts, and the container image's profile-guided
//! build calls it with arguments it accepts, from a build context that holds it.

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

#[test]
fn the_container_image_can_build_profile_guided() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let containerfile = std::fs::read_to_string(root.join("deploy/container/Containerfile"))
        .expect("read the Containerfile");
    assert!(
        containerfile.contains("ARG PGO=0"),
        "the plain build stays the default"
    );
    let call = containerfile
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .find_map(|line| line.split("deploy/pgo-build.sh").nth(1))
        .expect("the PGO=1 branch runs deploy/pgo-build.sh");
    let args: Vec<&str> = call
        .split(';')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert!(
        args.contains(&"/out/relay"),
        "it installs where the runtime stage copies from: {args:?}"
    );
    // --print-scenarios exits after the arguments are parsed, before anything is built.
    let with_check: Vec<&str> = args.iter().copied().chain(["--print-scenarios"]).collect();
    let (code, out, err) = run("deploy/pgo-build.sh", &with_check);
    assert_eq!(code, 0, "pgo-build.sh accepts {args:?}: {out}{err}");
    // The build context leaves deploy/ out, all but this script.
    let ignore = std::fs::read_to_string(root.join(".dockerignore")).expect("read .dockerignore");
    let lines: Vec<&str> = ignore.lines().map(str::trim).collect();
    let excluded = lines.iter().position(|l| *l == "deploy/");
    let included = lines.iter().position(|l| *l == "!deploy/pgo-build.sh");
    assert!(
        matches!((excluded, included), (None, _) | (Some(_), Some(_))),
        "deploy/ is ignored, so the script must be let back in"
    );
    if let (Some(excluded), Some(included)) = (excluded, included) {
        assert!(excluded < included, "the exception follows the exclusion");
    }
}
