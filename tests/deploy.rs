//! The operations files under `deploy/` against the real binary, so they cannot drift from the
//! code:
//!
//! - every `relay_*` metric that `deploy/prometheus/relay-rules.yml` and
//!   `deploy/grafana/relay-dashboard.json` query is exported by a running relay, and every
//!   label value they select on (`kind="io"`, `code=~"5xx|timeout"`, ...) appears on it;
//! - the config files shipped for systemd and Kubernetes are accepted by `relay --print-config`,
//!   and the stop timeouts around them leave room for relay's drain deadline.
//!
//! The per-instance families (`relay_upstream_*`, `relay_circuit_state`, health checks, webhook
//! instance counts) have samples only while a subsystem instance is registered, so the relay
//! under test gets one static instance (a fake upstream) and serves one proxied request.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use common::upstream::{Behaviour, Upstream};
use common::*;

both_drivers!(deploy_files_query_only_exported_metrics);

const RULES: &str = "deploy/prometheus/relay-rules.yml";
const DASHBOARD: &str = "deploy/grafana/relay-dashboard.json";

/// Labels Prometheus attaches to every scraped series itself; relay does not export them.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

fn repo_file(rel: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// What the deploy files reference
// ---------------------------------------------------------------------------------------------

/// One `relay_*` name found in a query, with the equality (`=`) and plain-alternation (`=~`)
/// label matchers that follow it: (label, allowed values).
#[derive(Debug)]
struct Reference {
    metric: String,
    matchers: Vec<(String, Vec<String>)>,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Parses `{a="x", b=~"y|z", c!="w"}` at the start of `s` into the matchers worth checking:
/// `=` with a literal value, `=~` whose value is a plain alternation of literals. Negative
/// matchers, real regexes and Grafana variables (`$x`) select nothing for certain and are
/// skipped.
fn label_matchers(s: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let Some(body) = s.strip_prefix('{') else {
        return out;
    };
    let Some(end) = body.find('}') else {
        return out;
    };
    let mut rest = &body[..end];
    loop {
        rest = rest.trim_start_matches([',', ' ', '\n']);
        let Some(op_at) = rest.find(['=', '!']) else {
            break;
        };
        let label = rest[..op_at].trim().to_string();
        let after = &rest[op_at..];
        let (op, after) = ["=~", "!~", "!=", "="]
            .iter()
            .find_map(|op| after.strip_prefix(op).map(|a| (*op, a)))
            .expect("a matcher operator");
        let after = after.trim_start();
        let Some(quote) = after.chars().next().filter(|c| *c == '"' || *c == '\'') else {
            break;
        };
        let Some(close) = after[1..].find(quote) else {
            break;
        };
        let value = &after[1..1 + close];
        rest = &after[close + 2..];
        let literal = !value.contains('$');
        match op {
            "=" if literal => out.push((label, vec![value.to_string()])),
            "=~" if literal
                && value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '|') =>
            {
                out.push((label, value.split('|').map(str::to_string).collect()))
            }
            _ => {}
        }
    }
    out
}

/// Every `relay_*` metric name in `text`: queries, and the prose around them too (a description
/// naming a metric should name a real one). Recording rules are named `relay:...`, so they are
/// not mistaken for exported metrics; a `:` ending a name is prose (`relay_x: what it is`), and
/// `relay_*` alone names no metric.
fn references(text: &str) -> Vec<Reference> {
    let mut out = Vec::new();
    let mut prev = ' ';
    for (i, c) in text.char_indices() {
        if c == 'r' && !is_name_char(prev) && text[i..].starts_with("relay_") {
            let len = text[i..]
                .find(|c: char| !is_name_char(c))
                .unwrap_or(text.len() - i);
            let metric = text[i..i + len].trim_end_matches(':');
            if metric.len() > "relay_".len() {
                let matchers = label_matchers(text[i + len..].trim_start());
                out.push(Reference {
                    metric: metric.to_string(),
                    matchers,
                });
            }
        }
        prev = c;
    }
    out
}

/// Every string in a JSON document (the dashboard's queries, legends, titles...).
fn json_strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| json_strings(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| json_strings(x, out)),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// What the relay exports
// ---------------------------------------------------------------------------------------------

/// Sample name -> the label sets of its samples, from Prometheus text format. A histogram's
/// family name (`# TYPE x histogram`) is added as well, with the labels of its `_bucket`,
/// `_sum` and `_count` samples, so either spelling may be referenced.
fn exported(text: &str) -> BTreeMap<String, Vec<BTreeMap<String, String>>> {
    let histograms: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" histogram"))
        .collect();
    let mut out: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let mut labels = BTreeMap::new();
        if line[name_end..].starts_with('{') {
            // relay's label values hold no `,` or `"`.
            let end = line.rfind('}').expect("closing brace of a label set");
            for pair in line[name_end + 1..end].split(',') {
                if let Some((k, v)) = pair.split_once('=') {
                    labels.insert(k.to_string(), v.trim_matches('"').to_string());
                }
            }
        }
        out.entry(name.to_string())
            .or_default()
            .push(labels.clone());
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(family) = name.strip_suffix(suffix) {
                if histograms.contains(family) {
                    out.entry(family.to_string()).or_default().push(labels);
                    break;
                }
            }
        }
    }
    out
}

/// What `file` references that the relay does not export, one line per problem.
fn missing(
    file: &str,
    text: &str,
    have: &BTreeMap<String, Vec<BTreeMap<String, String>>>,
) -> Vec<String> {
    let refs = references(text);
    assert!(
        refs.len() >= 10,
        "{file} should query relay's metrics; found only {refs:?}"
    );
    let mut problems = BTreeSet::new();
    for r in refs {
        let Some(samples) = have.get(&r.metric) else {
            problems.insert(format!(
                "{file} references the metric `{}`, which relay does not export",
                r.metric
            ));
            continue;
        };
        for (label, values) in &r.matchers {
            // Prometheus renames relay's own `instance` label (subsystem instances) to
            // `exported_instance`, as it clashes with the target label.
            let label = label.strip_prefix("exported_").unwrap_or(label);
            if TARGET_LABELS.contains(&label) && !samples.iter().any(|s| s.contains_key(label)) {
                continue;
            }
            for value in values {
                if !samples
                    .iter()
                    .any(|s| s.get(label).is_some_and(|v| v == value))
                {
                    problems.insert(format!(
                        "{file} selects `{}{{{label}=\"{value}\"}}`, but relay exports no such \
                         series (label values seen: {:?})",
                        r.metric,
                        samples
                            .iter()
                            .filter_map(|s| s.get(label))
                            .collect::<BTreeSet<_>>()
                    ));
                }
            }
        }
    }
    problems.into_iter().collect()
}

fn deploy_files_query_only_exported_metrics(driver: &str) {
    let up = Upstream::start("deploy-up", Behaviour::Normal);
    let toml = format!(
        "[[subsystems]]\nname = \"deploy\"\ninstance = \"deploy-1\"\nurl = \"{}\"\n\
         routes = [\"/deploy\"]\n[[subsystems.subscriptions]]\ntypes = [\"deploy.*\"]\n\
         path = \"/events\"\n",
        up.url()
    );
    let server = Server::start_with_config(driver, &toml);
    // Activity, so the values are real: one proxied request, one published event (delivered
    // to the subsystem as a webhook).
    let r = server.get("/deploy/x");
    assert_eq!(r.status, 200, "proxied request: {r}");
    publish(server.addr, &event_json("deploy.1", "deploy.test", "1"));
    wait_metric_at_least(
        &server,
        "relay_webhook_events_total{result=\"delivered\"}",
        1.0,
        Duration::from_secs(10),
    );

    let resp = server.get("/metrics");
    assert_eq!(resp.status, 200, "/metrics: {resp}");
    let have = exported(&resp.text());
    assert!(
        have.contains_key("relay_upstream_requests_total"),
        "the registered instance should have per-instance samples:\n{}",
        resp.text()
    );

    let mut problems = missing(RULES, &repo_file(RULES).replace("\\\"", "\""), &have);
    let dashboard: serde_json::Value = serde_json::from_str(&repo_file(DASHBOARD))
        .unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"));
    let mut strings = Vec::new();
    json_strings(&dashboard, &mut strings);
    problems.extend(missing(DASHBOARD, &strings.join("\n"), &have));
    assert!(
        problems.is_empty(),
        "the deploy files query what relay ({driver}) does not export:\n  {}\n\nrelay exports: {}",
        problems.join("\n  "),
        have.keys()
            .filter(|k| k.starts_with("relay_"))
            .cloned()
            .collect::<Vec<_>>()
            .join(" ")
    );
}

// ---------------------------------------------------------------------------------------------
// The shipped config files and stop timeouts
// ---------------------------------------------------------------------------------------------

/// Runs `relay --print-config --config FILE` with `env`; the printed config, or a panic naming
/// `what` and relay's complaint.
fn print_config(what: &str, file: &std::path::Path, env: &[(String, String)]) -> String {
    let out = relay_command()
        .arg("--config")
        .arg(file)
        .arg("--print-config")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("run relay --print-config");
    assert!(
        out.status.success(),
        "relay refuses {what} ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 config")
}

/// The integer after `key = ` in `[section]` of a TOML text.
fn toml_int(text: &str, section: &str, key: &str) -> u64 {
    let header = format!("[{section}]");
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == header;
        } else if let Some(v) = line
            .strip_prefix(key)
            .and_then(|r| r.trim_start().strip_prefix('='))
            .filter(|_| inside)
        {
            return v.trim().parse().expect("an integer");
        }
    }
    panic!("no {section}.{key} in:\n{text}")
}

/// The value of `Key=` (systemd) or `key:` (YAML) on its own line; `None` when absent.
fn setting<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().trim_matches('"'))
}

/// `KEY=VALUE` lines of an EnvironmentFile (comments and blank lines skipped).
fn env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not KEY=VALUE: {l}"));
            (k.to_string(), v.trim_matches('"').to_string())
        })
        .collect()
}

/// The block scalar under `key: |` in a YAML text, dedented.
fn yaml_block(text: &str, key: &str) -> String {
    let mut lines = text.lines();
    let indent = lines
        .by_ref()
        .find_map(|l| {
            let t = l.trim_start();
            (t.starts_with(key) && t.ends_with('|')).then(|| l.len() - t.len())
        })
        .unwrap_or_else(|| panic!("no `{key} |` block"));
    let body: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
        .collect();
    let inner = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    body.iter()
        .map(|l| l.get(inner..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn deploy_configs_are_accepted_and_outlast_the_drain() {
    let dir = TempDir::new();

    // systemd: the unit's config file with its EnvironmentFile; the stop timeout is longer than
    // the drain deadline, and the descriptor limit is the one tuning/ asks for.
    let unit = repo_file("deploy/systemd/relay.service");
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/relay.toml");
    let env = env_file(&repo_file("deploy/systemd/relay.env"));
    let config = print_config("deploy/systemd/relay.toml with relay.env", &file, &env);
    let deadline = toml_int(&config, "shutdown", "deadline_s");
    let stop: u64 = setting(&unit, "TimeoutStopSec=")
        .expect("TimeoutStopSec= in relay.service")
        .trim_end_matches('s')
        .parse()
        .expect("TimeoutStopSec in seconds");
    assert!(
        stop > deadline,
        "relay.service: TimeoutStopSec={stop} must exceed shutdown.deadline_s = {deadline}"
    );
    let nofile = repo_file("tuning/limits-relay.conf");
    let nofile = nofile
        .lines()
        .find(|l| l.contains("hard") && l.contains("nofile"))
        .and_then(|l| l.split_whitespace().last())
        .expect("a hard nofile line in tuning/limits-relay.conf");
    assert_eq!(
        setting(&unit, "LimitNOFILE="),
        Some(nofile),
        "relay.service: LimitNOFILE must match tuning/limits-relay.conf"
    );

    // Kubernetes: the ConfigMap's relay.toml; the grace period covers preStop plus the drain.
    let configmap = repo_file("deploy/kubernetes/configmap.yaml");
    let file = dir.write("relay.toml", &yaml_block(&configmap, "relay.toml:"));
    let config = print_config("the ConfigMap's relay.toml", &file, &[]);
    let deadline = toml_int(&config, "shutdown", "deadline_s");
    let deployment = repo_file("deploy/kubernetes/deployment.yaml");
    let grace: u64 = setting(&deployment, "terminationGracePeriodSeconds:")
        .expect("terminationGracePeriodSeconds in deployment.yaml")
        .parse()
        .expect("an integer grace period");
    let pre_stop: u64 = deployment
        .lines()
        .skip_while(|l| !l.contains("preStop:"))
        .find_map(|l| l.trim().strip_prefix("command: [\"sleep\", \""))
        .and_then(|v| v.split('"').next())
        .map_or(0, |v| v.parse().expect("preStop sleep seconds"));
    assert!(
        grace > pre_stop + deadline,
        "deployment.yaml: terminationGracePeriodSeconds ({grace}) must exceed the preStop sleep \
         ({pre_stop}) plus shutdown.deadline_s ({deadline})"
    );
}
