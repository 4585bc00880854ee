//! The deployment files under `deploy/` checked by the tools that consume them:
//!
//! - `deploy/k8s/base` and every overlay render with `kubectl kustomize`, and every object
//!   passes `kubernetes-validate --strict`; the rendered workloads hold to the rules below
//!   (hardening, probes, resources, secrets by reference only, relays on the host network with a
//!   grace period above their drain timeout, a PodDisruptionBudget for each).
//! - `promtool check config` on the scrape configurations, `promtool check rules` and
//!   `promtool test rules` on the alert rules.
//! - Every systemd unit has the hardening keys, drains within `TimeoutStopSec`, reads its
//!   secrets from an `EnvironmentFile=` that `deploy/README.md` documents, with variables the
//!   binary really reads; `systemd-analyze verify` where it exists.
//! - Every example configuration starts its service (unknown keys are a startup error).
//!
//! A missing tool fails the test with a message naming `scripts/setup.sh`, which installs it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use peerlink_testkit::proc::{Service, workspace_bin};
use serde_json::Value;

/// Kubernetes versions the manifests are validated against: the oldest supported (the preStop
/// `sleep` action is on by default from 1.30) and a current one.
const K8S_VERSIONS: [&str; 2] = ["1.30.0", "1.34.0"];

fn root() -> PathBuf {
    peerlink_testkit::workspace::root()
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

fn readme() -> String {
    read(&deploy().join("README.md"))
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let d = std::env::temp_dir().join(format!(
        "peerlink-deploy-{name}-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&d).expect("scratch directory");
    d
}

/// The path of `tool`, or a failure that says how to get it.
fn require(tool: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{tool}` is not on PATH: run `bash scripts/setup.sh` (it installs it)")
        })
}

/// Run `cmd` with a time bound; its output, or a failure naming the command.
fn run(mut cmd: Command, limit: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {shown}: {e}"));
    let (mut out, mut err) = (
        child.stdout.take().expect("stdout is piped"),
        child.stderr.take().expect("stderr is piped"),
    );
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for a child") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{shown} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Run and require success; stdout.
fn run_ok(cmd: Command, limit: Duration) -> String {
    let shown = format!("{cmd:?}");
    let o = run(cmd, limit);
    assert!(
        o.status.success(),
        "{shown} failed ({}):\n{}{}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

// ---------------------------------------------------------------------------------------------
// Kubernetes

/// `deploy/k8s/base` and each directory under `deploy/k8s/overlays`.
fn kustomizations() -> Vec<PathBuf> {
    let k8s = deploy().join("k8s");
    let mut v = vec![k8s.join("base")];
    if let Ok(rd) = std::fs::read_dir(k8s.join("overlays")) {
        let mut o: Vec<PathBuf> = rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.join("kustomization.yaml").is_file())
            .collect();
        o.sort();
        v.extend(o);
    }
    v
}

/// The rendered objects of a kustomization, as JSON (through PyYAML, which kubernetes-validate
/// brings).
fn objects(yaml: &Path) -> Vec<Value> {
    let mut py = Command::new(require("python3"));
    py.args([
        "-c",
        "import json, sys, yaml\n\
         docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
         print(json.dumps(docs))",
    ])
    .arg(yaml);
    let out = run(py, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "python3 could not read {} as YAML (PyYAML comes with kubernetes-validate: run \
         `bash scripts/setup.sh`): {}",
        yaml.display(),
        text(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).expect("python printed JSON") {
        Value::Array(v) => v,
        other => panic!("expected a list of objects, got {other}"),
    }
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn name_of(o: &Value) -> String {
    format!(
        "{}/{}",
        o["kind"].as_str().unwrap_or("?"),
        o["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// A `key = NUMBER` from a TOML text (the example configs write durations in seconds).
fn toml_number(toml: &str, key: &str) -> Option<f64> {
    toml.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.split('#').next().unwrap_or("").trim().parse().ok())?
    })
}

/// A `key = "DURATION"` (`10s`, `2m`) or `key = SECONDS` from a TOML text, in seconds.
fn toml_seconds(toml: &str, key: &str) -> Option<f64> {
    toml_number(toml, key).or_else(|| {
        toml.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            if k.trim() != key {
                return None;
            }
            let v = v.split('#').next()?.trim().trim_matches('"');
            let (n, mul) = if let Some(n) = v.strip_suffix("ms") {
                (n, 0.001)
            } else if let Some(n) = v.strip_suffix('s') {
                (n, 1.0)
            } else if let Some(n) = v.strip_suffix('m') {
                (n, 60.0)
            } else {
                (v, 1.0)
            };
            n.parse::<f64>().ok().map(|n| n * mul)
        })
    })
}

/// Every rule the rendered objects of one kustomization must keep; the list of problems.
fn check_objects(objs: &[Value], doc: &str) -> Vec<String> {
    let mut bad = Vec::new();
    let by_kind = |k: &'static str| objs.iter().filter(move |o| o["kind"] == k);
    let configmaps: BTreeMap<String, &Value> = by_kind("ConfigMap")
        .map(|o| (o["metadata"]["name"].as_str().unwrap_or("").to_owned(), o))
        .collect();
    let pdb_selectors: Vec<&Value> = by_kind("PodDisruptionBudget")
        .filter_map(|p| s(p, &["spec", "selector", "matchLabels"]))
        .collect();

    for o in objs {
        let n = name_of(o);
        if o["kind"] == "Secret" {
            bad.push(format!(
                "{n}: secrets are created by the operator, never shipped"
            ));
        }
        for l in ["app.kubernetes.io/part-of", "app.kubernetes.io/name"] {
            if o["kind"] != "Namespace" && s(o, &["metadata", "labels", l]).is_none() {
                bad.push(format!("{n}: no label {l}"));
            }
        }
    }

    let workloads: Vec<&Value> = objs
        .iter()
        .filter(|o| o["kind"] == "Deployment" || o["kind"] == "DaemonSet")
        .collect();
    for w in &workloads {
        let n = name_of(w);
        let pod = &w["spec"]["template"]["spec"];
        let labels = &w["spec"]["template"]["metadata"]["labels"];
        let matches = |sel: &Value| {
            sel.as_object()
                .is_some_and(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)))
        };
        if !pdb_selectors.iter().any(|sel| matches(sel)) {
            bad.push(format!("{n}: no PodDisruptionBudget selects its pods"));
        }
        if pod["securityContext"]["runAsNonRoot"] != true {
            bad.push(format!("{n}: pod securityContext.runAsNonRoot is not true"));
        }
        if pod["automountServiceAccountToken"] != false {
            bad.push(format!(
                "{n}: mounts a service account token it does not use"
            ));
        }
        for v in pod["volumes"].as_array().into_iter().flatten() {
            if let Some(cm) = v["configMap"]["name"].as_str()
                && !configmaps.contains_key(cm)
            {
                bad.push(format!(
                    "{n}: volume of ConfigMap {cm}, which is not rendered"
                ));
            }
        }
        for c in pod["containers"].as_array().into_iter().flatten() {
            let cn = format!("{n} container {}", c["name"].as_str().unwrap_or("?"));
            let sc = &c["securityContext"];
            if sc["readOnlyRootFilesystem"] != true {
                bad.push(format!("{cn}: readOnlyRootFilesystem is not true"));
            }
            if sc["allowPrivilegeEscalation"] != false {
                bad.push(format!("{cn}: allowPrivilegeEscalation is not false"));
            }
            if sc["capabilities"]["drop"] != serde_json::json!(["ALL"]) {
                bad.push(format!("{cn}: capabilities.drop is not [ALL]"));
            }
            let added: Vec<&str> = sc["capabilities"]["add"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let allowed: &[&str] = if w["kind"] == "DaemonSet" {
                &["NET_BIND_SERVICE"]
            } else {
                &[]
            };
            if added.iter().any(|a| !allowed.contains(a)) {
                bad.push(format!("{cn}: adds capabilities {added:?}"));
            }
            for r in ["requests", "limits"] {
                for k in ["cpu", "memory"] {
                    if s(c, &["resources", r, k]).is_none() {
                        bad.push(format!("{cn}: no resources.{r}.{k}"));
                    }
                }
            }
            for p in ["readinessProbe", "livenessProbe"] {
                if c.get(p).is_none() {
                    bad.push(format!("{cn}: no {p}"));
                }
            }
            for e in c["env"].as_array().into_iter().flatten() {
                let var = e["name"].as_str().unwrap_or("?");
                let secretish = ["SECRET", "TOKEN"].iter().any(|w| var.contains(w));
                match s(e, &["valueFrom", "secretKeyRef"]) {
                    Some(r) => {
                        let (sn, key) = (
                            r["name"].as_str().unwrap_or(""),
                            r["key"].as_str().unwrap_or(""),
                        );
                        for word in [sn, key] {
                            if !doc.contains(&format!("`{word}`")) {
                                bad.push(format!(
                                    "{cn}: {var} from Secret {sn} key {key}: `{word}` is not \
                                     documented in deploy/README.md"
                                ));
                            }
                        }
                    }
                    None if secretish => {
                        bad.push(format!("{cn}: {var} is not taken from a Secret"))
                    }
                    None => {}
                }
            }
            for e in c["envFrom"].as_array().into_iter().flatten() {
                if let Some(sn) = e["secretRef"]["name"].as_str()
                    && !doc.contains(&format!("`{sn}`"))
                {
                    bad.push(format!(
                        "{cn}: Secret {sn} is not documented in deploy/README.md"
                    ));
                }
            }
        }
    }

    // The relays: one per node on the host network, and a grace period that outlasts a drain.
    let relays: Vec<&&Value> = workloads
        .iter()
        .filter(|w| w["kind"] == "DaemonSet")
        .collect();
    if relays.is_empty() {
        bad.push("no DaemonSet (the relays)".into());
    }
    for w in relays {
        let n = name_of(w);
        let pod = &w["spec"]["template"]["spec"];
        if pod["hostNetwork"] != true {
            bad.push(format!("{n}: not on the host network"));
        }
        if pod["dnsPolicy"] != "ClusterFirstWithHostNet" {
            bad.push(format!("{n}: dnsPolicy is not ClusterFirstWithHostNet"));
        }
        let grace = pod["terminationGracePeriodSeconds"]
            .as_f64()
            .unwrap_or(30.0);
        let drain = mounted_toml(pod, &configmaps)
            .and_then(|t| toml_number(&t, "drain_timeout"))
            .unwrap_or(30.0);
        if grace <= drain {
            bad.push(format!(
                "{n}: terminationGracePeriodSeconds {grace} is not above drain_timeout {drain}"
            ));
        }
        let probe = s(
            &pod["containers"][0],
            &["readinessProbe", "httpGet", "path"],
        );
        if probe != Some(&Value::from("/readyz")) {
            bad.push(format!(
                "{n}: readiness is not /readyz (503 while draining)"
            ));
        }
    }

    // Signaling: readiness on /readyz (503 while draining) and time for the whole drain.
    for w in workloads
        .iter()
        .filter(|w| w["metadata"]["name"] == "peerlink-signaling")
    {
        let n = name_of(w);
        let pod = &w["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        if s(c, &["readinessProbe", "httpGet", "path"]) != Some(&Value::from("/readyz")) {
            bad.push(format!(
                "{n}: readiness is not /healthz (503 while draining)"
            ));
        }
        let pre = s(c, &["lifecycle", "preStop", "sleep", "seconds"])
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        let grace = mounted_toml(pod, &configmaps)
            .and_then(|t| toml_seconds(&t, "shutdown_grace"))
            .unwrap_or(2.0);
        // Sessions get up to 5 s, then shutdown_grace, then up to 10 s for the HTTP server.
        let needed = pre + 5.0 + grace + 10.0;
        let have = pod["terminationGracePeriodSeconds"]
            .as_f64()
            .unwrap_or(30.0);
        if have <= needed {
            bad.push(format!(
                "{n}: terminationGracePeriodSeconds {have} is not above the drain's {needed} s"
            ));
        }
    }
    bad
}

/// The TOML file in the ConfigMap mounted by a pod (its only data entry).
fn mounted_toml(pod: &Value, configmaps: &BTreeMap<String, &Value>) -> Option<String> {
    pod["volumes"].as_array()?.iter().find_map(|v| {
        let cm = configmaps.get(v["configMap"]["name"].as_str()?)?;
        cm["data"]
            .as_object()?
            .iter()
            .find(|(k, _)| k.ends_with(".toml"))
            .and_then(|(_, v)| v.as_str().map(str::to_owned))
    })
}

#[test]
fn kustomizations_render_and_validate() {
    let kubectl = require("kubectl");
    let validate = require("kubernetes-validate");
    let doc = readme();
    let dir = scratch("k8s");
    let mut problems = Vec::new();
    for k in kustomizations() {
        let rel = k.strip_prefix(root()).unwrap_or(&k).display().to_string();
        let mut cmd = Command::new(&kubectl);
        cmd.arg("kustomize").arg(&k);
        let yaml = run_ok(cmd, Duration::from_secs(60));
        let file = dir.join(format!("{}.yaml", rel.replace('/', "_")));
        std::fs::write(&file, &yaml).expect("writing the rendered manifests");
        for v in K8S_VERSIONS {
            let mut cmd = Command::new(&validate);
            cmd.args(["--strict", "--quiet", "-k", v]).arg(&file);
            let o = run(cmd, Duration::from_secs(120));
            let said = format!("{}{}", text(&o.stdout), text(&o.stderr));
            if !o.status.success() || said.contains("ERROR") {
                problems.push(format!(
                    "{rel}: kubernetes-validate --strict -k {v} failed:\n{said}"
                ));
            }
        }
        let objs = objects(&file);
        let kinds: BTreeSet<&str> = objs.iter().filter_map(|o| o["kind"].as_str()).collect();
        for want in [
            "Deployment",
            "DaemonSet",
            "Service",
            "ConfigMap",
            "PodDisruptionBudget",
        ] {
            if !kinds.contains(want) {
                problems.push(format!("{rel}: renders no {want}"));
            }
        }
        problems.extend(
            check_objects(&objs, &doc)
                .into_iter()
                .map(|p| format!("{rel}: {p}")),
        );
        println!("{rel}: {} objects rendered and valid", objs.len());
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Prometheus

#[test]
fn prometheus_config_and_rules_pass_promtool() {
    let promtool = require("promtool");
    let prom = deploy().join("prometheus");
    let rules = prom.join("rules");
    let mut rule_files: Vec<PathBuf> = std::fs::read_dir(&rules)
        .expect("deploy/prometheus/rules")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yml") && !p.to_string_lossy().ends_with(".test.yml")
        })
        .collect();
    rule_files.sort();
    assert!(
        !rule_files.is_empty(),
        "no rule files in {}",
        rules.display()
    );

    let mut cmd = Command::new(&promtool);
    cmd.args(["check", "rules"]).args(&rule_files);
    println!("{}", run_ok(cmd, Duration::from_secs(60)).trim());

    for t in std::fs::read_dir(&rules)
        .expect("rules")
        .filter_map(Result::ok)
    {
        let p = t.path();
        if p.to_string_lossy().ends_with(".test.yml") {
            let mut cmd = Command::new(&promtool);
            cmd.args(["test", "rules"]).arg(&p).current_dir(&rules);
            println!("{}", run_ok(cmd, Duration::from_secs(60)).trim());
        }
    }

    let mut cmd = Command::new(&promtool);
    cmd.args(["check", "config"])
        .arg(prom.join("prometheus.yml"));
    println!("{}", run_ok(cmd, Duration::from_secs(60)).trim());

    // Debian's promtool is built without Kubernetes service discovery: then the relabelling
    // is checked with a static target in place of kubernetes_sd_configs.
    let k8s = prom.join("prometheus-kubernetes.yml");
    let mut cmd = Command::new(&promtool);
    cmd.args(["check", "config"]).arg(&k8s);
    let o = run(cmd, Duration::from_secs(60));
    let said = format!("{}{}", text(&o.stdout), text(&o.stderr));
    if !o.status.success() && said.contains("field kubernetes_sd_configs not found") {
        let cfg = read(&k8s);
        let mut out = String::new();
        // Indentation of the kubernetes_sd_configs key while its block is being left out.
        let mut skip_deeper_than: Option<usize> = None;
        for line in cfg.lines() {
            let indent = line.len() - line.trim_start().len();
            if let Some(d) = skip_deeper_than {
                if line.trim().is_empty() || indent > d {
                    continue;
                }
                skip_deeper_than = None;
            }
            if line.trim_start().starts_with("kubernetes_sd_configs:") {
                let pad = " ".repeat(indent);
                out.push_str(&format!(
                    "{pad}static_configs:\n{pad}  - targets: [\"127.0.0.1:9\"]\n"
                ));
                skip_deeper_than = Some(indent);
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
        assert!(
            !out.contains("kubernetes_sd_configs"),
            "could not stand in for kubernetes_sd_configs"
        );
        let copy = prom.join(format!(
            ".prometheus-kubernetes-check-{}.yml",
            std::process::id()
        ));
        std::fs::write(&copy, out).expect("writing the stand-in config");
        let mut cmd = Command::new(&promtool);
        cmd.args(["check", "config"]).arg(&copy);
        let o = run(cmd, Duration::from_secs(60));
        let _ = std::fs::remove_file(&copy);
        assert!(
            o.status.success(),
            "{}: promtool check config (Kubernetes discovery stood in for) failed:\n{}{}",
            k8s.display(),
            text(&o.stdout),
            text(&o.stderr)
        );
        println!(
            "prometheus-kubernetes.yml: this promtool lacks Kubernetes discovery; the rest of \
             the file checked with a static target in its place"
        );
    } else {
        assert!(o.status.success(), "{}: {said}", k8s.display());
        println!("{}", said.trim());
    }
}

/// Every metric name the rules use is one the services expose (their `/metrics` names).
#[test]
fn alert_rules_use_only_exposed_metrics() {
    let exposed = exposed_metric_names();
    let mut unknown = BTreeSet::new();
    for e in std::fs::read_dir(deploy().join("prometheus/rules"))
        .expect("rules")
        .filter_map(Result::ok)
    {
        let p = e.path();
        if p.to_string_lossy().ends_with(".test.yml") {
            continue;
        }
        let t = read(&p);
        for word in t.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')) {
            let w = word.trim_end_matches(':');
            if w.starts_with("peerlink_") && !w.contains(':') && !exposed.contains(w) {
                unknown.insert(w.to_owned());
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "rules use metrics no service exposes: {unknown:?}"
    );
}

/// The `/metrics` sample names of a running directory, relay and signaling node.
fn exposed_metric_names() -> BTreeSet<String> {
    let dir = scratch("metrics");
    let fleet = Fleet::start(&dir);
    let mut names = BTreeSet::new();
    for addr in [&fleet.directory, &fleet.relay_metrics, &fleet.signaling] {
        let body = http_get(addr, "/metrics").1;
        for l in body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let n = l.split(['{', ' ']).next().unwrap_or("");
            names.insert(n.to_owned());
        }
    }
    assert!(
        names.iter().any(|n| n.starts_with("peerlink_relay_"))
            && names.iter().any(|n| n.starts_with("peerlink_signaling_"))
            && names.iter().any(|n| n.starts_with("peerlink_directory_")),
        "every service exposes metrics: {names:?}"
    );
    drop(fleet);
    let _ = std::fs::remove_dir_all(&dir);
    names
}

// ---------------------------------------------------------------------------------------------
// systemd

/// `[Section]` -> key -> values of a unit file.
type Unit = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn parse_unit(t: &str) -> Unit {
    let mut u = Unit::new();
    let mut section = String::new();
    for line in t.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_owned();
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            u.entry(section.clone())
                .or_default()
                .entry(k.trim().to_owned())
                .or_default()
                .push(v.trim().to_owned());
        }
    }
    u
}

fn units() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(deploy())
        .expect("deploy/")
        .filter_map(Result::ok)
    {
        if let Ok(rd) = std::fs::read_dir(e.path()) {
            v.extend(
                rd.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "service")),
            );
        }
    }
    v.sort();
    v
}

/// Keys every unit's [Service] must set, with the value each must have (None: any value).
const HARDENING: &[(&str, Option<&str>)] = &[
    ("NoNewPrivileges", Some("yes")),
    ("ProtectSystem", Some("strict")),
    ("ProtectHome", Some("yes")),
    ("PrivateTmp", Some("yes")),
    ("PrivateDevices", Some("yes")),
    ("ProtectKernelTunables", Some("yes")),
    ("ProtectKernelModules", Some("yes")),
    ("ProtectKernelLogs", Some("yes")),
    ("ProtectControlGroups", Some("yes")),
    ("ProtectClock", Some("yes")),
    ("ProtectHostname", Some("yes")),
    ("RestrictNamespaces", Some("yes")),
    ("RestrictRealtime", Some("yes")),
    ("RestrictSUIDSGID", Some("yes")),
    ("LockPersonality", Some("yes")),
    ("MemoryDenyWriteExecute", Some("yes")),
    ("SystemCallArchitectures", Some("native")),
    ("RestrictAddressFamilies", None),
    ("CapabilityBoundingSet", None),
    ("KillSignal", Some("SIGTERM")),
    ("TimeoutStopSec", None),
    ("EnvironmentFile", None),
    ("ExecStart", None),
];

#[test]
fn systemd_units_are_hardened_and_documented() {
    let doc = readme();
    let units = units();
    let names: Vec<String> = units
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    for want in [
        "peerlink-directory.service",
        "peerlink-relay.service",
        "peerlink-signaling.service",
    ] {
        assert!(names.iter().any(|n| n == want), "no {want} under deploy/");
    }
    let mut bad = Vec::new();
    for p in &units {
        let rel = p.strip_prefix(root()).unwrap_or(p).display().to_string();
        let u = parse_unit(&read(p));
        let svc = u.get("Service").cloned().unwrap_or_default();
        let one = |k: &str| svc.get(k).and_then(|v| v.last()).map(String::as_str);
        for (k, want) in HARDENING {
            match (one(k), want) {
                (None, _) => bad.push(format!("{rel}: no {k}=")),
                (Some(v), Some(w)) if v != *w => bad.push(format!("{rel}: {k}={v}, want {w}")),
                _ => {}
            }
        }
        if one("DynamicUser") != Some("yes") && one("User").is_none() {
            bad.push(format!("{rel}: neither DynamicUser=yes nor User="));
        }
        if !doc.contains(&format!("`{}`", names_of(p))) {
            bad.push(format!(
                "{rel}: {} is not documented in deploy/README.md",
                names_of(p)
            ));
        }

        let exec = one("ExecStart").unwrap_or("");
        let binary = exec.split_whitespace().next().unwrap_or("");
        let bin_name = Path::new(binary)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // The config the unit reads is the one shipped beside it, named like the binary.
        let config = exec
            .split_whitespace()
            .skip_while(|w| *w != "--config")
            .nth(1)
            .unwrap_or("");
        let shipped = p.with_extension("toml");
        if config.is_empty() || !shipped.is_file() {
            bad.push(format!(
                "{rel}: no --config with {} beside it",
                shipped.display()
            ));
        } else if !doc.contains(config) {
            bad.push(format!(
                "{rel}: {config} is not documented in deploy/README.md"
            ));
        }

        // Drain: longer than the drain time the config gives (relay: drain_timeout; signaling:
        // 5 s for sessions, shutdown_grace, 10 s for the HTTP server).
        let stop = one("TimeoutStopSec").and_then(|v| v.parse::<f64>().ok());
        let toml = std::fs::read_to_string(&shipped).unwrap_or_default();
        let drain = match bin_name.as_str() {
            "peerlink-relay" => toml_number(&toml, "drain_timeout").unwrap_or(30.0),
            "peerlink-signaling" => 15.0 + toml_seconds(&toml, "shutdown_grace").unwrap_or(2.0),
            _ => toml_number(&toml, "request_timeout").unwrap_or(10.0),
        };
        match stop {
            Some(s) if s > drain => {}
            _ => bad.push(format!(
                "{rel}: TimeoutStopSec={stop:?} is not above the drain time {drain} s"
            )),
        }

        // Secrets: the env file is documented, its example ships beside the unit, and every
        // variable in it is one the binary reads.
        let help = run_ok(
            {
                let mut c = Command::new(workspace_bin(&bin_name));
                c.arg("--help");
                c
            },
            Duration::from_secs(300),
        );
        for f in svc.get("EnvironmentFile").into_iter().flatten() {
            let f = f.trim_start_matches('-');
            if !doc.contains(f) {
                bad.push(format!("{rel}: EnvironmentFile {f} is not documented"));
            }
            let example = p.with_extension("env.example");
            let Ok(ex) = std::fs::read_to_string(&example) else {
                bad.push(format!("{rel}: no {} for {f}", example.display()));
                continue;
            };
            for var in ex
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
            {
                if !help.contains(&format!("[env: {var}")) {
                    bad.push(format!("{rel}: {var} is not read by {bin_name}"));
                }
                if !doc.contains(&format!("`{var}`")) {
                    bad.push(format!(
                        "{rel}: {var} is not documented in deploy/README.md"
                    ));
                }
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));

    // systemd's own parser, with ExecStart pointed at the built binaries.
    let Some(analyze) = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("systemd-analyze"))
        .find(|p| p.is_file())
    else {
        println!("skipped systemd-analyze verify: systemd-analyze is not installed");
        return;
    };
    let dir = scratch("units");
    for p in &units {
        let t = read(p);
        let u = parse_unit(&t);
        let exec = &u["Service"]["ExecStart"][0];
        let binary = exec.split_whitespace().next().unwrap_or("");
        let name = Path::new(binary)
            .file_name()
            .expect("a file name")
            .to_string_lossy();
        let built = workspace_bin(&name);
        let copy = dir.join(p.file_name().expect("a file name"));
        std::fs::write(&copy, t.replace(binary, &built.to_string_lossy())).expect("unit copy");
        let mut cmd = Command::new(&analyze);
        cmd.arg("verify").arg(&copy);
        let o = run(cmd, Duration::from_secs(60));
        let said = format!("{}{}", text(&o.stdout), text(&o.stderr));
        // Units named in Before=/After= but not installed here are not this unit's problem.
        let said: Vec<&str> = said
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.contains("not found"))
            .collect();
        assert!(
            o.status.success() && said.is_empty(),
            "systemd-analyze verify {}: {}\n{}",
            p.display(),
            o.status,
            said.join("\n")
        );
        println!("systemd-analyze verify {}: ok", names_of(p));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn names_of(p: &Path) -> String {
    p.file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned()
}

// ---------------------------------------------------------------------------------------------
// The example configurations start their services

fn free_udp() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
}

fn free_tcp() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free TCP port")
        .port()
}

/// (status code, body) of `GET path` on `addr`.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

fn wait_http_ok(addr: &str, path: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() && http_get(addr, path).0 == 200 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

const CLUSTER_TOKEN: &str = "deploy-test-cluster-token";
const TURN_SECRET: &str = "deploy-test-turn-secret";
const TOKEN_SECRET: &str = "deploy-test-token-secret-of-32-bytes!!";

fn directory_with(config: &Path) -> (Service, String) {
    let mut cmd = Command::new(workspace_bin("peerlink-directory"));
    cmd.arg("--config")
        .arg(config)
        .args(["--listen", "127.0.0.1:0"])
        .env("PEERLINK_CLUSTER_TOKEN", CLUSTER_TOKEN);
    let mut d = Service::start("peerlink-directory", cmd);
    let addr = d.wait_for(Duration::from_secs(20), |l| {
        l.strip_prefix("listening on ").map(str::to_owned)
    });
    (d, addr)
}

/// A relay with `config`, its addresses overridden to loopback; the metrics address once
/// `/readyz` answers 200.
fn relay_with(config: &Path, directory: &str) -> (Service, String) {
    let metrics = format!("127.0.0.1:{}", free_tcp());
    let mut cmd = Command::new(workspace_bin("peerlink-relay"));
    cmd.arg("--config")
        .arg(config)
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_udp()))
        .args(["--relay-ip", "127.0.0.1", "--workers", "1"])
        .arg("--metrics")
        .arg(&metrics)
        .arg("--directory")
        .arg(format!("http://{directory}"))
        .env("PEERLINK_CLUSTER_TOKEN", CLUSTER_TOKEN)
        .env("PEERLINK_RELAY_AUTH_SECRET", TURN_SECRET);
    let mut r = Service::start("peerlink-relay", cmd);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ready = false;
    while !ready && Instant::now() < deadline && matches!(r.child().try_wait(), Ok(None)) {
        ready = wait_http_ok(&metrics, "/readyz", Duration::from_millis(300));
    }
    assert!(
        ready,
        "peerlink-relay --config {} never became ready (exit: {:?})",
        config.display(),
        r.child().try_wait()
    );
    (r, metrics)
}

fn signaling_with(config: &Path, directory: &str, dir: &Path) -> (Service, String) {
    let db = dir.join(format!("signaling-{}.db", free_tcp()));
    let mut cmd = Command::new(workspace_bin("peerlink-signaling"));
    cmd.arg("--config")
        .arg(config)
        .args(["--listen", "127.0.0.1:0", "--stun", "127.0.0.1:0"])
        .arg("--db")
        .arg(&db)
        .arg("--directory")
        .arg(format!("http://{directory}"))
        .args(["--internal-url", "http://127.0.0.1:1"])
        .env("PEERLINK_CLUSTER_TOKEN", CLUSTER_TOKEN)
        .env("PEERLINK_TOKEN_SECRET", TOKEN_SECRET)
        .env("PEERLINK_TURN_SECRET", TURN_SECRET);
    let mut s = Service::start("peerlink-signaling", cmd);
    let http = s.wait_for(Duration::from_secs(30), |l| {
        l.strip_prefix("http=").map(str::to_owned)
    });
    assert!(wait_http_ok(&http, "/healthz", Duration::from_secs(10)));
    (s, http)
}

struct Fleet {
    _procs: Vec<Service>,
    directory: String,
    relay_metrics: String,
    signaling: String,
}

impl Fleet {
    /// The fleet of the systemd example configurations.
    fn start(dir: &Path) -> Fleet {
        let d = deploy();
        let (dp, directory) = directory_with(&d.join("directory/peerlink-directory.toml"));
        let (rp, relay_metrics) = relay_with(&d.join("relay/peerlink-relay.toml"), &directory);
        let (sp, signaling) = signaling_with(
            &d.join("signaling/peerlink-signaling.toml"),
            &directory,
            dir,
        );
        Fleet {
            _procs: vec![dp, rp, sp],
            directory,
            relay_metrics,
            signaling,
        }
    }
}

#[test]
fn example_configs_start_their_services() {
    let dir = scratch("configs");
    let fleet = Fleet::start(&dir);
    // The Kubernetes ConfigMaps' files, on the same directory.
    let base = deploy().join("k8s/base/config");
    let (_d, _) = directory_with(&base.join("directory.toml"));
    let mut configs = vec![base.clone()];
    configs.extend(
        kustomizations()
            .into_iter()
            .skip(1)
            .filter(|k| k.join("relay.toml").is_file() || k.join("signaling.toml").is_file()),
    );
    for c in configs {
        if c.join("relay.toml").is_file() {
            let _r = relay_with(&c.join("relay.toml"), &fleet.directory);
            println!("{}: relay ready", c.join("relay.toml").display());
        }
        if c.join("signaling.toml").is_file() {
            let _s = signaling_with(&c.join("signaling.toml"), &fleet.directory, &dir);
            println!("{}: signaling up", c.join("signaling.toml").display());
        }
    }
    // The systemd fleet's relay and node registered with its directory.
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let m = http_get(&fleet.directory, "/metrics").1;
        let gauge = |n: &str| {
            m.lines()
                .find_map(|l| l.strip_prefix(n)?.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        if gauge("peerlink_directory_relays_healthy ") >= 1.0
            && gauge("peerlink_directory_nodes ") >= 1.0
        {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "relays and nodes did not register with the directory:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(body.contains("peerlink_directory_"));
    drop(fleet);
    let _ = std::fs::remove_dir_all(&dir);
}
