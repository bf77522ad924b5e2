//! Checks `deploy/` against the code it deploys: the Kubernetes manifests agree with each other
//! and with the config they carry, that config is accepted by the binary's own parser, the
//! containerd-setup init container writes where containerd reads, the host-network overlay
//! changes only what it means to, and the Grafana dashboard only queries metrics (and labels)
//! the facade exports. A deployment that drifts from the binary fails here instead of in a
//! cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use registry_facade::config::{self, MapEnv};
use serde_json::{Value, json};
use test_support::proc::{have, run};
use yaml_rust2::{Yaml, YamlLoader};

/// The metric names the dashboard may use, with their labels (`le` is implied for `_bucket`).
const METRICS: &[(&str, &[&str])] = &[
    ("registry_facade_http_requests_total", &["route", "method", "status_class"]),
    ("registry_facade_http_request_duration_seconds_bucket", &["route"]),
    ("registry_facade_inflight_requests", &["route"]),
    ("registry_facade_response_aborted_total", &["reason"]),
    ("registry_facade_http_response_bytes_total", &["route"]),
    ("registry_facade_blob_first_byte_seconds_bucket", &["source"]),
    ("registry_facade_blob_bytes_total", &["source"]),
    ("registry_facade_blob_source_requests_total", &["source", "outcome"]),
    ("registry_facade_upstream_requests_total", &["kind", "status_class"]),
    ("registry_facade_upstream_retries_total", &["reason"]),
    ("registry_facade_singleflight_joins_total", &[]),
    ("registry_facade_cache_lookups_total", &["cache", "result"]),
    ("registry_facade_backfill_total", &["store", "outcome"]),
    ("registry_facade_digest_mismatches_total", &["source"]),
    ("registry_facade_spec_requests_total", &["provider", "outcome"]),
    ("registry_facade_spec_request_duration_seconds_bucket", &["provider"]),
    ("registry_facade_store_bytes", &[]),
];

/// Labels Prometheus adds to every scraped series (ServiceMonitor target labels).
const TARGET_LABELS: &[&str] = &["instance", "job", "pod", "namespace", "service", "container", "endpoint"];

/// PromQL words that are not metric names.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "topk",
    "bottomk",
    "rate",
    "irate",
    "increase",
    "delta",
    "histogram_quantile",
    "clamp_min",
    "clamp_max",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "label_values",
];

const ROWS: &[&str] = &["Requests", "Blobs & sources", "Upstream", "Caches", "Spec provider"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("deploy")
}

fn k8s_dir() -> PathBuf {
    deploy_dir().join("kubernetes")
}

/// YAML as JSON values, so the checks read like the API objects they are.
fn yaml_to_json(y: &Yaml) -> Value {
    match y {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => json!(i),
        Yaml::Real(s) => json!(s.parse::<f64>().unwrap_or_else(|_| panic!("bad float {s:?}"))),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Array(a) => Value::Array(a.iter().map(yaml_to_json).collect()),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        other => panic!("non-string mapping key {other:?}"),
                    };
                    (key, yaml_to_json(v))
                })
                .collect(),
        ),
        Yaml::Alias(_) | Yaml::BadValue => panic!("unsupported YAML node {y:?}"),
    }
}

/// Every document of a (multi-document) YAML text.
fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    let docs = YamlLoader::load_from_str(text).unwrap_or_else(|e| panic!("{what}: {e}"));
    docs.iter().map(yaml_to_json).filter(|v| !v.is_null()).collect()
}

/// Every manifest under deploy/kubernetes: (file name, document).
fn manifests() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for name in yaml_files() {
        let text = std::fs::read_to_string(k8s_dir().join(&name)).unwrap();
        for doc in yaml_docs(&text, &name) {
            out.push((name.clone(), doc));
        }
    }
    out
}

fn yaml_files() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(k8s_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    names.sort();
    names
}

/// The one document of `kind`.
fn only(kind: &str) -> Value {
    let found: Vec<Value> = manifests().into_iter().map(|(_, d)| d).filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind}, found {}", found.len());
    found.into_iter().next().unwrap()
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str().unwrap_or_else(|| panic!("{what}: expected a string, found {v}"))
}

fn arr<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_array().unwrap_or_else(|| panic!("{what}: expected a list, found {v}"))
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector.as_object().is_some_and(|sel| !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn facade_container(ds: &Value) -> &Value {
    arr(&ds["spec"]["template"]["spec"]["containers"], "containers")
        .iter()
        .find(|c| c["name"] == "registry-facade")
        .expect("a container named registry-facade")
}

/// A container port by number or by name.
fn container_port(container: &Value, port: &Value) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = str_of(port, "port");
    arr(&container["ports"], "ports")
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

fn named_port<'a>(container: &'a Value, name: &str) -> &'a Value {
    arr(&container["ports"], "ports")
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

/// The config file the container runs with: (path in the container, volume mount, volume).
fn config_mount(ds: &Value) -> (PathBuf, Value, Value) {
    let c = facade_container(ds);
    let args: Vec<&str> = arr(&c["args"], "args").iter().map(|a| str_of(a, "arg")).collect();
    let run = args.iter().position(|a| *a == "run").expect("args hold the `run` command");
    let path = PathBuf::from(*args.get(run + 1).expect("`run` is followed by the config path"));
    assert!(path.is_absolute(), "config path {} is relative", path.display());
    let dir = path.parent().unwrap();
    let mount = arr(&c["volumeMounts"], "volumeMounts")
        .iter()
        .find(|m| Path::new(str_of(&m["mountPath"], "mountPath")) == dir)
        .unwrap_or_else(|| panic!("no volume is mounted at {}, the config file's directory", dir.display()))
        .clone();
    let volume = volume(ds, str_of(&mount["name"], "mount name")).clone();
    (path, mount, volume)
}

fn volume<'a>(ds: &'a Value, name: &str) -> &'a Value {
    arr(&ds["spec"]["template"]["spec"]["volumes"], "volumes")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume named {name}"))
}

/// The config text the DaemonSet's container is started with, found through its args, its
/// volume mount and the ConfigMap.
fn deployed_config_text() -> String {
    let ds = only("DaemonSet");
    let cm = only("ConfigMap");
    let (path, mount, vol) = config_mount(&ds);
    assert!(mount.get("subPath").is_none(), "the config is mounted with subPath, so ConfigMap updates never arrive");
    assert_eq!(vol["configMap"]["name"], cm["metadata"]["name"], "the config volume is not the ConfigMap");
    let file = path.file_name().unwrap().to_str().unwrap();
    let key = match vol["configMap"].get("items") {
        None => file.to_string(),
        Some(items) => arr(items, "items")
            .iter()
            .find(|i| i["path"] == file)
            .map(|i| str_of(&i["key"], "key").to_string())
            .unwrap_or_else(|| panic!("the config volume's items do not project {file}")),
    };
    str_of(&cm["data"][&key], &format!("ConfigMap data {key}")).to_string()
}

/// What a mounted file is made of, from the config key that names it.
enum Fixture {
    File(Vec<u8>),
    Dir,
}

struct Pki {
    ca: String,
    crt: String,
    key: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(rcgen::DnType::CommonName, "deploy test ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["registry-facade".to_string()]).unwrap();
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Pki { ca: ca_pem, crt: leaf.signed_by(&key, &issuer).unwrap().pem(), key: key.serialize_pem() }
}

/// The file a config key (its JSON path, e.g. `registry.remoteSpecProvider[0].tls.ca`) names.
fn fixture_for(key: &str, pki: &Pki) -> Fixture {
    let last = key.rsplit('.').next().unwrap();
    match last {
        "store" => Fixture::Dir,
        "ca" => Fixture::File(pki.ca.clone().into_bytes()),
        "crt" => Fixture::File(pki.crt.clone().into_bytes()),
        "key" => Fixture::File(pki.key.clone().into_bytes()),
        "dockerAuth" => Fixture::File(br#"{"auths":{}}"#.to_vec()),
        "fixedSpecFN" => Fixture::File(b"{}".to_vec()),
        _ => panic!("{key} names a path in a mounted volume; teach fixture_for what that file holds"),
    }
}

/// Every string of the config that is a path inside one of the container's mounts:
/// (JSON path, mount path, the string).
fn mounted_paths(config: &Value, mounts: &[String]) -> Vec<(String, String, String)> {
    fn walk(v: &Value, at: &str, mounts: &[String], out: &mut Vec<(String, String, String)>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let at = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
                    walk(v, &at, mounts, out);
                }
            }
            Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    walk(v, &format!("{at}[{i}]"), mounts, out);
                }
            }
            Value::String(s) => {
                if let Some(m) = mounts.iter().find(|m| s == *m || s.starts_with(&format!("{m}/"))) {
                    out.push((at.to_string(), m.clone(), s.clone()));
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(config, "", mounts, &mut out);
    out
}

/// The deployed config with every mounted path moved under `root` and the files it names
/// written there, plus the environment the DaemonSet gives the container.
fn materialize(root: &Path) -> (String, MapEnv) {
    let ds = only("DaemonSet");
    let c = facade_container(&ds);
    let mounts: Vec<String> = arr(&c["volumeMounts"], "volumeMounts")
        .iter()
        .map(|m| str_of(&m["mountPath"], "mountPath").trim_end_matches('/').to_string())
        .collect();
    let mut cfg: Value = serde_json::from_str(&deployed_config_text()).expect("config.json is JSON");
    let pki = pki();
    for (key, _, path) in mounted_paths(&cfg, &mounts) {
        let local = root.join(path.trim_start_matches('/'));
        match fixture_for(&key, &pki) {
            Fixture::Dir => std::fs::create_dir_all(&local).unwrap(),
            Fixture::File(bytes) => {
                std::fs::create_dir_all(local.parent().unwrap()).unwrap();
                std::fs::write(&local, bytes).unwrap();
            }
        }
        let slot = json_path_mut(&mut cfg, &key);
        *slot = Value::String(local.to_str().unwrap().to_string());
    }
    let env: BTreeMap<String, String> = c["env"]
        .as_array()
        .map(|vars| {
            vars.iter()
                .map(|e| {
                    let name = str_of(&e["name"], "env name").to_string();
                    let value = e["value"].as_str().map(str::to_string).unwrap_or_else(|| match name.as_str() {
                        "IPFS_HOST" => "10.0.0.7".to_string(),
                        _ => "from-a-secret".to_string(),
                    });
                    (name, value)
                })
                .collect()
        })
        .unwrap_or_default();
    (serde_json::to_string_pretty(&cfg).unwrap(), MapEnv(env))
}

/// The value at a path such as `registry.remoteSpecProvider[0].tls.ca`.
fn json_path_mut<'a>(mut v: &'a mut Value, path: &str) -> &'a mut Value {
    for part in path.split('.') {
        let (name, index) = match part.split_once('[') {
            Some((n, i)) => (n, Some(i.trim_end_matches(']').parse::<usize>().unwrap())),
            None => (part, None),
        };
        v = &mut v[name];
        if let Some(i) = index {
            v = &mut v[i];
        }
    }
    v
}

/// The deployed config through the binary's own parser, with the files it names in place.
fn parse_deployed(root: &Path) -> config::Config {
    let (text, env) = materialize(root);
    let (config_path, _, _) = config_mount(&only("DaemonSet"));
    let base = root.join(config_path.parent().unwrap().strip_prefix("/").unwrap());
    std::fs::create_dir_all(&base).unwrap();
    config::parse(&text, &base, &env).unwrap_or_else(|e| panic!("the deployed config is refused: {e}"))
}

#[test]
fn kustomization_lists_exactly_the_manifests() {
    let text = std::fs::read_to_string(k8s_dir().join("kustomization.yaml")).unwrap();
    let k = yaml_docs(&text, "kustomization.yaml").remove(0);
    assert_eq!(k["kind"], "Kustomization");
    let listed: Vec<&str> = arr(&k["resources"], "resources").iter().map(|r| str_of(r, "resource")).collect();
    let listed_set: BTreeSet<&str> = listed.iter().copied().collect();
    assert_eq!(listed.len(), listed_set.len(), "a resource is listed twice: {listed:?}");
    let present: BTreeSet<String> = yaml_files().into_iter().filter(|n| n != "kustomization.yaml").collect();
    let present: BTreeSet<&str> = present.iter().map(String::as_str).collect();
    assert_eq!(listed_set, present, "kustomization.yaml resources differ from the files in deploy/kubernetes");
}

#[test]
fn manifests_hold_the_kinds_a_deployment_needs() {
    let docs = manifests();
    let mut kinds = BTreeMap::<String, usize>::new();
    for (file, d) in &docs {
        let kind = str_of(&d["kind"], &format!("{file}: kind"));
        str_of(&d["apiVersion"], &format!("{file}: apiVersion"));
        if kind != "Kustomization" {
            str_of(&d["metadata"]["name"], &format!("{file}: metadata.name"));
            assert!(d["metadata"].get("namespace").is_none(), "{file}: the namespace is set by kustomization.yaml");
        }
        *kinds.entry(kind.to_string()).or_default() += 1;
    }
    for kind in ["ConfigMap", "DaemonSet", "Service", "ServiceMonitor", "Kustomization"] {
        assert_eq!(kinds.get(kind), Some(&1), "kinds found: {kinds:?}");
    }
    let allowed: BTreeSet<&str> =
        ["Namespace", "ConfigMap", "DaemonSet", "Service", "ServiceMonitor", "Kustomization"].into();
    for kind in kinds.keys() {
        assert!(allowed.contains(kind.as_str()), "unexpected kind {kind} (no RBAC is needed)");
    }
}

#[test]
fn deployed_config_is_accepted_by_the_real_parser() {
    let root = tempfile::tempdir().unwrap();
    let cfg = parse_deployed(root.path());
    let [remote] = cfg.remote_spec_providers.as_slice() else {
        panic!("expected one remote spec provider, found {:?}", cfg.remote_spec_providers)
    };
    assert_eq!(remote.addr, "dns:///ws-manager:8080");
    let tls = remote.tls.as_ref().expect("the spec provider is reached over TLS");
    assert!(tls.identity.is_some(), "ws-manager wants mutual TLS: a client certificate and key");
    assert!(cfg.fixed_spec_file.is_none(), "production specs come from ws-manager, not a file");
    let ds = only("DaemonSet");
    let c = facade_container(&ds);

    let registry = named_port(c, "registry");
    assert_eq!(registry["containerPort"].as_u64(), Some(u64::from(cfg.listen.port())), "registry.port");
    assert_eq!(registry["hostPort"].as_u64(), Some(31750), "containerd reaches the facade on the node's port 31750");
    assert!(cfg.listen.ip().is_unspecified(), "the registry must listen on the pod IP, not {}", cfg.listen);

    let metrics = cfg.prometheus_addr.expect("prometheusAddr is set");
    assert!(metrics.ip().is_unspecified(), "Prometheus scrapes the pod IP; prometheusAddr is {metrics}");
    assert_eq!(named_port(c, "metrics")["containerPort"].as_u64(), Some(u64::from(metrics.port())));

    let probes = cfg.readiness_addr.expect("readinessProbeAddr is set");
    assert!(probes.ip().is_unspecified(), "kubelet probes the pod IP; readinessProbeAddr is {probes}");
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/live"), ("startupProbe", "/live")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(container_port(c, &get["port"]), u64::from(probes.port()), "{probe} port vs readinessProbeAddr");
    }

    // The store is the hostPath volume, so content survives pod restarts.
    let store = cfg.store.expect("registry.store is set");
    let store_in_pod = Path::new("/").join(store.strip_prefix(root.path()).unwrap());
    let mount = arr(&c["volumeMounts"], "volumeMounts")
        .iter()
        .find(|m| Path::new(str_of(&m["mountPath"], "mountPath")) == store_in_pod)
        .unwrap_or_else(|| panic!("registry.store {} is not a volume mount", store_in_pod.display()));
    assert!(mount["readOnly"] != true, "the store mount is read-only");
    assert!(volume(&ds, str_of(&mount["name"], "name")).get("hostPath").is_some(), "the store is not a hostPath");

    // SIGKILL must not cut the drain: preStop sleep + shutdownGrace < terminationGracePeriodSeconds.
    let pod = &ds["spec"]["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
    let pre_stop: Vec<&str> =
        arr(&c["lifecycle"]["preStop"]["exec"]["command"], "preStop").iter().map(|a| str_of(a, "arg")).collect();
    assert_eq!(pre_stop.first(), Some(&"sleep"), "preStop: {pre_stop:?}");
    let sleep: u64 = pre_stop[1].parse().unwrap();
    assert!((1..=15).contains(&sleep), "preStop sleeps {sleep}s");
    assert!(
        Duration::from_secs(grace) > cfg.shutdown_grace + Duration::from_secs(sleep),
        "terminationGracePeriodSeconds {grace} <= preStop {sleep}s + facade.shutdownGrace {:?}",
        cfg.shutdown_grace
    );
    assert!(cfg.docker_auth.is_some(), "dockerAuth");
}

#[test]
fn config_paths_are_provided_by_mounted_volumes() {
    let ds = only("DaemonSet");
    let c = facade_container(&ds);
    let cfg: Value = serde_json::from_str(&deployed_config_text()).unwrap();
    let mounts: Vec<&Value> = arr(&c["volumeMounts"], "volumeMounts").iter().collect();
    let mount_paths: Vec<String> = mounts.iter().map(|m| str_of(&m["mountPath"], "mountPath").to_string()).collect();
    let found = mounted_paths(&cfg, &mount_paths);
    let keys: BTreeSet<&str> = found.iter().map(|(k, _, _)| k.as_str()).collect();
    for key in ["registry.store", "dockerAuth", "registry.remoteSpecProvider[0].tls.ca"] {
        assert!(keys.contains(key), "{key} does not point into a mounted volume (found {keys:?})");
    }
    for (key, mount_path, path) in &found {
        let mount = mounts.iter().find(|m| m["mountPath"] == mount_path.as_str()).unwrap();
        let vol = volume(&ds, str_of(&mount["name"], "name"));
        let rel = path.strip_prefix(mount_path.as_str()).unwrap().trim_start_matches('/');
        if let Some(secret) = vol.get("secret") {
            assert_eq!(mount["readOnly"], true, "{key}: secret mount is not read-only");
            assert_ne!(secret["optional"], true, "{key}: the facade refuses to start without {path}");
            let items = secret["items"].as_array().unwrap_or_else(|| {
                panic!("{key}: secret volume {} needs items so the file name is fixed here", secret["secretName"])
            });
            assert!(items.iter().any(|i| i["path"] == rel), "{key}: secret volume does not project {rel}");
        } else if let Some(cm) = vol.get("configMap") {
            assert!(only("ConfigMap")["data"].get(rel).is_some() && cm.get("items").is_none(), "{key}: {rel}");
        } else {
            assert!(vol.get("hostPath").is_some() || vol.get("emptyDir").is_some(), "{key}: volume {vol}");
        }
    }
}

#[test]
fn daemonset_rolls_safely_and_runs_locked_down() {
    let ds = only("DaemonSet");
    let spec = &ds["spec"];
    let pod = &spec["template"]["spec"];
    let c = facade_container(&ds);

    assert!(labels_match(&spec["selector"]["matchLabels"], &spec["template"]["metadata"]["labels"]));
    assert_eq!(spec["updateStrategy"]["type"], "RollingUpdate");
    let rolling = &spec["updateStrategy"]["rollingUpdate"];
    assert_eq!(rolling["maxUnavailable"], 1);
    // A surge pod would want the same hostPort on the same node, so it could never start.
    assert_eq!(rolling.get("maxSurge").map_or(0, |v| v.as_u64().expect("maxSurge is a number")), 0);

    assert_eq!(pod["automountServiceAccountToken"], false, "no RBAC is needed, so no token either");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert!(pod["securityContext"]["runAsUser"].as_u64().is_some_and(|u| u != 0));
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert!(
        sc.get("runAsUser").is_none() && sc.get("runAsNonRoot").is_none(),
        "the facade inherits the pod's non-root user"
    );
    // A read-only root needs somewhere writable for the process's temp files.
    let tmp =
        arr(&c["volumeMounts"], "volumeMounts").iter().find(|m| m["mountPath"] == "/tmp").expect("/tmp is mounted");
    assert!(volume(&ds, str_of(&tmp["name"], "name")).get("emptyDir").is_some());

    let res = &c["resources"];
    for (what, v) in [("requests.memory", &res["requests"]["memory"]), ("limits.memory", &res["limits"]["memory"])] {
        str_of(v, what);
    }
    assert!(res["requests"]["cpu"].is_string(), "requests.cpu");

    let env = arr(&c["env"], "env");
    let var = |name: &str| env.iter().find(|e| e["name"] == name).unwrap_or_else(|| panic!("env {name}"));
    let redis = &var("REDIS_PASSWORD")["valueFrom"]["secretKeyRef"];
    assert!(redis["name"].is_string() && redis["key"].is_string());
    assert_eq!(redis["optional"], true, "a missing Redis secret must not stop the pod");
    assert_eq!(var("IPFS_HOST")["valueFrom"]["fieldRef"]["fieldPath"], "status.hostIP");

    let init = pod["initContainers"].as_array().map(Vec::as_slice).unwrap_or_default();
    for ic in init {
        let caps = &ic["securityContext"]["capabilities"];
        assert_eq!(caps["drop"], json!(["ALL"]), "init container {}", ic["name"]);
        assert_eq!(ic["securityContext"]["allowPrivilegeEscalation"], false);
    }
}

#[test]
fn service_and_service_monitor_reach_the_metrics_port() {
    let ds = only("DaemonSet");
    let svc = only("Service");
    let sm = only("ServiceMonitor");
    let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
    assert!(labels_match(&svc["spec"]["selector"], pod_labels), "the Service selects no facade pod");
    assert!(
        labels_match(&sm["spec"]["selector"]["matchLabels"], &svc["metadata"]["labels"]),
        "the ServiceMonitor selects no Service"
    );
    let c = facade_container(&ds);
    let ports = arr(&svc["spec"]["ports"], "Service ports");
    let endpoints = arr(&sm["spec"]["endpoints"], "ServiceMonitor endpoints");
    assert!(!endpoints.is_empty());
    for ep in endpoints {
        let name = str_of(&ep["port"], "endpoint port");
        let port =
            ports.iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("Service has no port named {name}"));
        let target = port.get("targetPort").unwrap_or(&port["port"]);
        assert_eq!(
            container_port(c, target),
            container_port(c, &json!("metrics")),
            "the scraped port is not the metrics port"
        );
        assert_eq!(ep["path"], "/metrics");
    }
}

/// Tokens of a PromQL expression that matter here.
#[derive(Debug, Default)]
struct PromRefs {
    metrics: BTreeSet<String>,
    labels: BTreeSet<String>,
    unknown: BTreeSet<String>,
}

fn promql_refs(expr: &str) -> PromRefs {
    let chars: Vec<char> = expr.chars().collect();
    let mut refs = PromRefs::default();
    let mut i = 0;
    let mut braces = 0usize;
    let mut label_list = false;
    let mut last_word = String::new();
    while i < chars.len() {
        let ch = chars[i];
        if ch == '"' || ch == '\'' || ch == '`' {
            i += 1;
            while i < chars.len() && chars[i] != ch {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else if ch == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if ch == '$' {
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
        } else if ch.is_ascii_digit() || (ch == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if braces > 0 || label_list {
                refs.labels.insert(word.clone());
            } else if word.starts_with("registry_facade_") {
                refs.metrics.insert(word.clone());
            } else if !PROMQL_WORDS.contains(&word.as_str()) {
                refs.unknown.insert(word.clone());
            }
            last_word = word;
        } else {
            match ch {
                '{' => braces += 1,
                '}' => braces = braces.saturating_sub(1),
                '(' if braces == 0 => {
                    label_list = matches!(
                        last_word.as_str(),
                        "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                    );
                }
                ')' => label_list = false,
                _ => {}
            }
            if !ch.is_whitespace() {
                last_word.clear();
            }
            i += 1;
        }
    }
    refs
}

/// Checks one query: known metrics only, labels those metrics (or the scrape) carry.
fn check_query(expr: &str, legend: &str, what: &str, used: &mut BTreeSet<String>) {
    let known: BTreeMap<&str, &[&str]> = METRICS.iter().copied().collect();
    let refs = promql_refs(expr);
    assert!(refs.unknown.is_empty(), "{what}: unknown names {:?} in {expr}", refs.unknown);
    assert!(!refs.metrics.is_empty(), "{what}: no registry_facade metric in {expr}");
    let mut allowed: BTreeSet<&str> = TARGET_LABELS.iter().copied().collect();
    for m in &refs.metrics {
        let labels = known.get(m.as_str()).unwrap_or_else(|| panic!("{what}: {m} is not one of the facade's metrics"));
        allowed.extend(labels.iter().copied());
        if m.ends_with("_bucket") {
            allowed.insert("le");
        }
        used.insert(m.clone());
    }
    for l in &refs.labels {
        assert!(allowed.contains(l.as_str()), "{what}: label {l} is not on {:?}", refs.metrics);
    }
    for part in legend.split("{{").skip(1) {
        let l = part.split("}}").next().unwrap().trim();
        assert!(allowed.contains(l), "{what}: legend uses {{{{{l}}}}}, not a label of {:?}", refs.metrics);
    }
}

#[test]
fn promql_refs_sees_metrics_labels_and_strangers() {
    let r = promql_refs(
        r#"histogram_quantile(0.99, sum by (le, route) (rate(registry_facade_x_bucket{instance=~"$instance", a!="}"}[$__rate_interval]))) / up"#,
    );
    assert_eq!(r.metrics, BTreeSet::from(["registry_facade_x_bucket".to_string()]));
    assert_eq!(r.labels, ["a", "instance", "le", "route"].iter().map(|s| s.to_string()).collect());
    assert_eq!(r.unknown, BTreeSet::from(["up".to_string()]));
}

#[test]
fn grafana_dashboard_queries_only_exported_metrics() {
    let path = deploy_dir().join("grafana/registry-facade.json");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("the dashboard is JSON");
    assert_eq!(d["schemaVersion"], 39);
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty() && u.len() <= 40), "uid");
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()), "title");

    let vars = arr(&d["templating"]["list"], "templating.list");
    let ds = vars.iter().find(|v| v["name"] == "DS_PROMETHEUS").expect("a DS_PROMETHEUS variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");

    let mut used = BTreeSet::new();
    for v in vars.iter().filter(|v| v["type"] == "query") {
        let def = str_of(&v["definition"], "variable definition");
        let inner =
            def.strip_prefix("label_values(").and_then(|s| s.strip_suffix(')')).expect("label_values(metric, label)");
        let (metric, label) = inner.rsplit_once(',').unwrap();
        check_query(metric, &format!("{{{{{}}}}}", label.trim()), &format!("variable {}", v["name"]), &mut used);
    }

    let mut panels: Vec<&Value> = Vec::new();
    for p in arr(&d["panels"], "panels") {
        panels.push(p);
        if let Some(nested) = p["panels"].as_array() {
            panels.extend(nested);
        }
    }
    let ids: Vec<u64> = panels.iter().map(|p| p["id"].as_u64().expect("panel id")).collect();
    assert_eq!(ids.len(), ids.iter().collect::<BTreeSet<_>>().len(), "panel ids repeat");
    let rows: BTreeSet<&str> =
        panels.iter().filter(|p| p["type"] == "row").map(|p| str_of(&p["title"], "row title")).collect();
    for row in ROWS {
        assert!(rows.contains(row), "no row {row:?} (rows: {rows:?})");
    }
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let title = str_of(&p["title"], "panel title");
        assert!(p["gridPos"]["w"].as_u64().is_some() && p["gridPos"]["h"].as_u64().is_some(), "{title}: gridPos");
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{title}: datasource");
        let targets = arr(&p["targets"], &format!("{title}: targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            let expr = str_of(&t["expr"], &format!("{title}: expr"));
            check_query(expr, t["legendFormat"].as_str().unwrap_or(""), title, &mut used);
        }
    }
    let missing: Vec<&str> = METRICS.iter().map(|(m, _)| *m).filter(|m| !used.contains(*m)).collect();
    assert!(missing.is_empty(), "metrics with no panel: {missing:?}");
}

/// The objects `kubectl kustomize <dir>` builds. kubectl is part of what `make test` installs
/// (scripts/install-deps.sh), so a machine without it fails here instead of passing unchecked.
fn kubectl_kustomize(dir: &Path) -> Vec<Value> {
    assert!(have("kubectl"), "kubectl missing: run `make deps` as root (Debian package kubernetes-client)");
    let mut cmd = std::process::Command::new("kubectl");
    cmd.arg("kustomize").arg(dir);
    let out =
        run(cmd, Duration::from_secs(60)).unwrap_or_else(|e| panic!("kubectl kustomize {}: {e:#}", dir.display()));
    yaml_docs(&out, "kustomize output")
}

/// Built objects by `Kind/name`.
fn by_kind_and_name(docs: &[Value]) -> BTreeMap<String, Value> {
    docs.iter()
        .map(|d| (format!("{}/{}", str_of(&d["kind"], "kind"), str_of(&d["metadata"]["name"], "name")), d.clone()))
        .collect()
}

/// `kubectl kustomize` (when kubectl is installed) builds the same objects this test read: it
/// catches kustomization mistakes and any YAML that Go's parser reads differently.
#[test]
fn kubectl_kustomize_builds_the_same_objects() {
    let built = kubectl_kustomize(&k8s_dir());

    let k =
        yaml_docs(&std::fs::read_to_string(k8s_dir().join("kustomization.yaml")).unwrap(), "kustomization").remove(0);
    let images: BTreeMap<&str, String> = k["images"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|i| {
            let name = str_of(&i["name"], "image name");
            let new = format!("{}:{}", i["newName"].as_str().unwrap_or(name), str_of(&i["newTag"], "newTag"));
            (name, new)
        })
        .collect();
    let mut ours: Vec<Value> =
        manifests().into_iter().map(|(_, d)| d).filter(|d| d["kind"] != "Kustomization").collect();
    for d in &mut ours {
        if let Some(ns) = k["namespace"].as_str() {
            d["metadata"]["namespace"] = json!(ns);
        }
        for list in ["containers", "initContainers"] {
            if let Some(cs) = d.pointer_mut(&format!("/spec/template/spec/{list}")).and_then(Value::as_array_mut) {
                for c in cs {
                    if let Some(new) = c["image"].as_str().and_then(|i| images.get(i)) {
                        c["image"] = json!(new);
                    }
                }
            }
        }
    }
    let (ours, built) = (by_kind_and_name(&ours), by_kind_and_name(&built));
    assert_eq!(ours.keys().collect::<Vec<_>>(), built.keys().collect::<Vec<_>>());
    for (k, v) in &ours {
        assert_eq!(v, &built[k], "{k} reads differently through kubectl");
    }
    let ds = &built["DaemonSet/registry-facade"];
    assert!(
        !str_of(&facade_container(ds)["image"], "image").ends_with(":latest"),
        "the image is pinned by kustomization"
    );
}

/// The flags of a command line, `--name value` pairs after the subcommand.
fn flags(args: &[&str]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if let Some(name) = a.strip_prefix("--") {
            let v = it.next().unwrap_or_else(|| panic!("--{name} has no value in {args:?}"));
            assert!(out.insert(name.to_string(), v.to_string()).is_none(), "--{name} twice in {args:?}");
        }
    }
    out
}

/// The node path a container path lands on, through a hostPath mount of that container.
fn node_path_of(ds: &Value, container: &Value, path: &Path) -> Option<(PathBuf, Value)> {
    let mounts = container["volumeMounts"].as_array()?;
    let m = mounts
        .iter()
        .filter(|m| path.starts_with(str_of(&m["mountPath"], "mountPath")))
        .max_by_key(|m| str_of(&m["mountPath"], "mountPath").len())?;
    let host = volume(ds, str_of(&m["name"], "name")).get("hostPath")?;
    let rest = path.strip_prefix(str_of(&m["mountPath"], "mountPath")).unwrap();
    Some((Path::new(str_of(&host["path"], "hostPath.path")).join(rest), m.clone()))
}

/// The containerd-setup init container runs the real `setup` with this deployment's port, and
/// what it writes lands in the node's /etc/containerd/certs.d (containerd's config_path), for
/// the same scheme (https with --ca exactly when the facade serves TLS).
#[test]
fn containerd_setup_writes_where_containerd_reads() {
    let ds = only("DaemonSet");
    let c = facade_container(&ds);
    let init = arr(&ds["spec"]["template"]["spec"]["initContainers"], "initContainers");
    let setup = init
        .iter()
        .find(|ic| ic["args"].as_array().is_some_and(|a| a.first() == Some(&json!("setup"))))
        .expect("an init container running `registry-facade setup`");
    assert_eq!(setup["image"], c["image"], "setup runs from the facade's own image");
    assert!(setup.get("command").is_none(), "setup needs the image's registry-facade entrypoint");
    let args: Vec<&str> = arr(&setup["args"], "args").iter().map(|a| str_of(a, "arg")).collect();
    let f = flags(&args[1..]);

    let port: u16 = f["port"].parse().unwrap();
    assert_eq!(named_port(c, "registry")["hostPort"].as_u64(), Some(u64::from(port)), "--port vs the hostPort");
    let hostname = f["hostname"].as_str();
    if let Some(var) = hostname.strip_prefix("$(").and_then(|h| h.strip_suffix(')')) {
        let env = arr(&setup["env"], "setup env").iter().find(|e| e["name"] == var).expect("--hostname's variable");
        assert_eq!(env["valueFrom"]["fieldRef"]["fieldPath"], "status.hostIP", "--hostname {hostname}");
    }

    let root = tempfile::tempdir().unwrap();
    let cfg = parse_deployed(root.path());
    let hostfs = Path::new(&f["hostfs"]);
    let ca = f.get("ca").map(|p| {
        let vol = arr(&setup["volumeMounts"], "setup volumeMounts")
            .iter()
            .find(|m| Path::new(p).starts_with(str_of(&m["mountPath"], "mountPath")))
            .map(|m| volume(&ds, str_of(&m["name"], "name")))
            .unwrap_or_else(|| panic!("--ca {p} is not in a mounted volume"));
        assert!(vol.get("secret").is_some(), "--ca {p} comes from a Secret");
        let local = root.path().join("ca.crt");
        std::fs::write(&local, pki().ca).unwrap();
        local
    });
    assert_eq!(ca.is_some(), cfg.tls.is_some(), "setup's --ca and registry.tls go together (https iff TLS)");

    // The real command, with the node's filesystem as a temp dir.
    let fake_hostfs = tempfile::tempdir().unwrap();
    let written = registry_facade::setup::run(&registry_facade::setup::SetupOptions {
        hostname: "10.0.0.7".into(),
        port,
        hostfs: fake_hostfs.path().into(),
        ca,
    })
    .unwrap();
    let text = std::fs::read_to_string(&written).unwrap();
    let scheme = if cfg.tls.is_some() { "https" } else { "http" };
    assert!(text.contains(&format!("server = \"{scheme}://10.0.0.7:{}\"", cfg.listen.port())), "{text}");
    let in_container = hostfs.join(written.strip_prefix(fake_hostfs.path()).unwrap());
    let (on_node, mount) = node_path_of(&ds, setup, &in_container)
        .unwrap_or_else(|| panic!("{} is not on a hostPath mount of the setup container", in_container.display()));
    let want = Path::new("/etc/containerd/certs.d/10.0.0.7:31750/hosts.toml");
    assert_eq!(on_node, want, "setup writes {} on the node, not into containerd's certs.d", on_node.display());
    assert_ne!(mount["readOnly"], true, "setup writes through {}", mount["mountPath"]);
}

/// The host-network overlay: the base with hostNetwork, no declared ports (each would become a
/// hostPort and keep the surge pod off the node) and a surging update; nothing else differs.
#[test]
fn host_network_overlay_surges_without_port_conflicts() {
    let base = kubectl_kustomize(&k8s_dir());
    let overlay = kubectl_kustomize(&deploy_dir().join("host-network"));
    let (base, mut overlay) = (by_kind_and_name(&base), by_kind_and_name(&overlay));
    assert_eq!(base.keys().collect::<Vec<_>>(), overlay.keys().collect::<Vec<_>>());
    let root = tempfile::tempdir().unwrap();
    let cfg = parse_deployed(root.path());

    let ds = overlay.get_mut("DaemonSet/registry-facade").unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet", "dns:///ws-manager needs cluster DNS");
    for list in ["containers", "initContainers"] {
        for c in pod[list].as_array().map(Vec::as_slice).unwrap_or_default() {
            assert!(c.get("ports").is_none(), "{} declares ports, which become hostPorts", c["name"]);
        }
    }
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!((rolling["maxSurge"].as_u64(), rolling["maxUnavailable"].as_u64()), (Some(1), Some(0)));
    assert!(ds["spec"]["minReadySeconds"].as_u64().is_some_and(|s| s > 0), "minReadySeconds");
    assert_eq!(cfg.listen.port(), 31750, "containerd reaches the node's port 31750 directly");
    let probes = cfg.readiness_addr.expect("readinessProbeAddr").port();
    let c = facade_container(ds);
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["port"].as_u64(), Some(u64::from(probes)), "{probe}");
    }
    let svc = &overlay["Service/registry-facade-metrics"];
    let metrics = cfg.prometheus_addr.expect("prometheusAddr").port();
    assert_eq!(svc["spec"]["ports"][0]["targetPort"].as_u64(), Some(u64::from(metrics)), "Service targetPort");

    // Put the base's values back where the overlay patches: the rest must be the base.
    let base_ds = &base["DaemonSet/registry-facade"];
    let ds = overlay.get_mut("DaemonSet/registry-facade").unwrap();
    ds["spec"]["updateStrategy"] = base_ds["spec"]["updateStrategy"].clone();
    ds["spec"].as_object_mut().unwrap().remove("minReadySeconds");
    let pod = ds["spec"]["template"]["spec"].as_object_mut().unwrap();
    pod.remove("hostNetwork");
    pod.remove("dnsPolicy");
    let base_c = facade_container(base_ds).clone();
    let c = ds.pointer_mut("/spec/template/spec/containers/0").unwrap();
    assert_eq!(c["name"], "registry-facade");
    for key in ["ports", "startupProbe", "readinessProbe", "livenessProbe"] {
        c[key] = base_c[key].clone();
    }
    let svc = overlay.get_mut("Service/registry-facade-metrics").unwrap();
    svc["spec"]["ports"][0]["targetPort"] =
        base["Service/registry-facade-metrics"]["spec"]["ports"][0]["targetPort"].clone();
    for (k, v) in &base {
        assert_eq!(&overlay[k], v, "{k}: the overlay changes more than it should");
    }
}

/// Cargo loads every workspace member to build any one of them, so the Containerfile's build
/// context must hold each (a member left out fails `cargo build` in the image, not here).
#[test]
fn containerfile_copies_every_workspace_member() {
    let root = deploy_dir().parent().unwrap().to_path_buf();
    let mut cmd = std::process::Command::new(env!("CARGO"));
    cmd.args(["metadata", "--no-deps", "--format-version", "1", "--offline"]).current_dir(&root);
    let out = run(cmd, Duration::from_secs(60)).unwrap_or_else(|e| panic!("cargo metadata: {e:#}"));
    let meta: Value = serde_json::from_str(&out).unwrap();
    let workspace_root = PathBuf::from(str_of(&meta["workspace_root"], "workspace_root"));

    let containerfile = std::fs::read_to_string(deploy_dir().join("Containerfile")).unwrap();
    let copied: BTreeSet<String> = containerfile
        .lines()
        .filter_map(|l| l.trim().strip_prefix("COPY "))
        .filter(|rest| !rest.contains("--from="))
        .flat_map(|rest| {
            let words: Vec<&str> = rest.split_whitespace().filter(|w| !w.starts_with("--")).collect();
            let sources = &words[..words.len().saturating_sub(1)];
            sources.iter().map(|w| w.trim_start_matches("./").trim_end_matches('/').to_string()).collect::<Vec<_>>()
        })
        .collect();
    let ignored: BTreeSet<String> = std::fs::read_to_string(deploy_dir().join("Containerfile.dockerignore"))
        .unwrap()
        .lines()
        .map(|l| l.trim().trim_start_matches('/').trim_end_matches('/').to_string())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for file in ["Cargo.toml", "Cargo.lock", "rust-toolchain.toml"] {
        assert!(copied.contains(file), "the Containerfile does not copy {file} (copies {copied:?})");
    }
    for p in arr(&meta["packages"], "packages") {
        let manifest = PathBuf::from(str_of(&p["manifest_path"], "manifest_path"));
        let rel = manifest.parent().unwrap().strip_prefix(&workspace_root).unwrap().to_path_buf();
        let top = rel.components().next().unwrap().as_os_str().to_str().unwrap().to_string();
        let name = &p["name"];
        assert!(
            copied.contains(&top) || copied.contains(rel.to_str().unwrap()),
            "workspace member {name} ({}) is not copied by deploy/Containerfile",
            rel.display()
        );
        assert!(!ignored.contains(&top), "workspace member {name}: Containerfile.dockerignore drops {top}");
    }
}
