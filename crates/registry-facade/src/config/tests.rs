//! The parser's tests: every problem named by its key, defaults as the README shows them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;

fn parse_str(s: &str) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("specs.json"), "{}").unwrap();
    parse(s, dir.path(), &MapEnv::default())
}

#[test]
fn legacy_metrics_default_on_and_can_be_turned_off() {
    let on = parse_str(r#"{"registry": {"port": 0, "fixedSpecFN": "specs.json"}}"#).unwrap();
    assert!(on.legacy_metrics);
    let off =
        parse_str(r#"{"registry": {"port": 0, "fixedSpecFN": "specs.json"}, "facade": {"legacyMetrics": false}}"#)
            .unwrap();
    assert!(!off.legacy_metrics);
    let bad = parse_str(r#"{"registry": {"port": 0, "fixedSpecFN": "specs.json"}, "facade": {"legacyMetrics": "no"}}"#)
        .unwrap_err();
    assert!(bad.to_string().contains("legacyMetrics"), "{bad}");
}

#[test]
fn accepts_the_reference_shape() {
    let c = parse_str(
        r#"{"registry": {"port": 31750, "prefix": "", "store": "/tmp/x", "requireAuth": false,
            "staticLayer": [{"ref": "registry.example/supervisor:v1", "type": "image"}],
            "fixedSpecFN": "specs.json",
            "redis": {"enabled": false, "singleHostAddr": "redis:6379", "username": "", "useTLS": false},
            "ipfs": {"enabled": false, "ipfsAddr": "/ip4/127.0.0.1/tcp/5001"}},
           "dockerAuth": "", "prometheusAddr": "127.0.0.1:9500", "readinessProbeAddr": ":8086"}"#,
    )
    .unwrap();
    assert_eq!(c.listen.port(), 31750);
    assert_eq!(c.readiness_addr.unwrap().to_string(), "0.0.0.0:8086");
    assert_eq!(c.static_layers.len(), 1);
    assert_eq!(c.images.compose_ttl, Duration::from_secs(30));
}

/// The reference installer's rendering (README, "Migrating from the Go facade"; the keys and
/// their order as Go's JSON encoder writes them), with its placeholders replaced by real files.
const INSTALLER_RENDERING: &str = r#"{
  "registry": {
"port": 31750,
"prefix": "",
"staticLayer": [
  {"ref": "<registry>/gitpod/supervisor:commit-…", "type": "image"},
  {"ref": "<registry>/gitpod/workspacekit:commit-…", "type": "image"},
  {"ref": "<registry>/gitpod/docker-up:commit-…", "type": "image"}
],
"remoteSpecProvider": [{"addr": "dns:///ws-manager-mk2:8080",
                        "tls": {"ca": "<client-certs>/ca.crt",
                                "crt": "<client-certs>/tls.crt",
                                "key": "<client-certs>/tls.key"}}],
"store": "<cache-dir>",
"requireAuth": false,
"tls": {"ca": "", "crt": "<certs>/tls.crt", "key": "<certs>/tls.key"},
"redis": {"enabled": true, "singleHostAddr": "redis:6379"},
"ipfs": {"enabled": true, "ipfsAddr": "/ip4/$IPFS_HOST/tcp/5001"}
  },
  "dockerAuth": "<pull-secret>/pull-secret.json",
  "pprofAddr": "127.0.0.1:6060",
  "prometheusAddr": "127.0.0.1:9500",
  "readinessProbeAddr": ":8086"
}"#;

/// A directory with every file the installer's rendering names, and that rendering.
fn installer_files() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for sub in ["client-certs", "certs", "pull-secret"] {
        std::fs::create_dir(d.join(sub)).unwrap();
    }
    for f in ["client-certs/ca.crt", "client-certs/tls.crt", "client-certs/tls.key", "certs/tls.crt", "certs/tls.key"] {
        std::fs::write(d.join(f), "x").unwrap();
    }
    std::fs::write(d.join("pull-secret/pull-secret.json"), r#"{"auths": {}}"#).unwrap();
    let text = INSTALLER_RENDERING
        .replace("<registry>", "registry.example.com")
        .replace("commit-…", "commit-0123abcd")
        .replace("<client-certs>", &d.join("client-certs").display().to_string())
        .replace("<certs>", &d.join("certs").display().to_string())
        .replace("<pull-secret>", &d.join("pull-secret").display().to_string())
        .replace("<cache-dir>", &d.join("cache").display().to_string());
    (dir, text)
}

fn ipfs_host_env() -> MapEnv {
    MapEnv(BTreeMap::from([("IPFS_HOST".to_string(), "10.0.0.7".to_string())]))
}

#[test]
fn starts_from_the_installer_rendering_unchanged() {
    let (dir, text) = installer_files();
    let c = parse(&text, dir.path(), &ipfs_host_env()).unwrap();
    assert_eq!(c.listen, "0.0.0.0:31750".parse().unwrap());
    assert_eq!(c.tls, Some((dir.path().join("certs/tls.crt"), dir.path().join("certs/tls.key"))));
    assert_eq!(c.registry_tls_ca, None, "\"ca\": \"\" is no CA");
    assert_eq!(c.client_auth, ClientAuth::Off);
    assert_eq!(c.static_layers.len(), 3);
    let p = &c.remote_spec_providers;
    assert_eq!((p.len(), p[0].addr.as_str()), (1, "dns:///ws-manager-mk2:8080"));
    let tls = p[0].tls.as_ref().unwrap();
    assert_eq!(tls.ca, dir.path().join("client-certs/ca.crt"));
    assert!(tls.identity.is_some());
    assert_eq!(c.spec.server_name, "ws-manager");
    assert_eq!(c.store, Some(dir.path().join("cache")));
    let redis = c.cluster.redis.as_ref().unwrap();
    assert_eq!((redis.addr.as_str(), redis.tls, redis.insecure_skip_verify), ("redis:6379", false, false));
    assert_eq!(c.cluster.ipfs.as_ref().unwrap().api, "http://10.0.0.7:5001");
    assert_eq!(c.docker_auth, Some(dir.path().join("pull-secret/pull-secret.json")));
    assert_eq!(c.pprof_addr.as_deref(), Some("127.0.0.1:6060"));
    assert_eq!(c.prometheus_addr, Some("127.0.0.1:9500".parse().unwrap()));
    assert_eq!(c.readiness_addr, Some("0.0.0.0:8086".parse().unwrap()));
    let notices = c.startup_notices();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(notices[0].starts_with("pprofAddr \"127.0.0.1:6060\"") && notices[0].contains("/metrics"), "{notices:?}");

    // Go's encoder writes a nil slice as null; an empty TLS section (no certificate
    // configured in the installer) is plain HTTP.
    let text =
        text.replace(r#""prefix": """#, r#""prefix": null"#).replace(r#""tls": {"ca": "","#, r#""tls": {"ca": null,"#);
    let text = text.replacen(r#""staticLayer": ["#, r#""staticLayer": null, "unused": ["#, 1);
    let e = parse(&text, dir.path(), &ipfs_host_env()).unwrap_err().to_string();
    assert!(e.contains("registry.unused: unknown field `unused`"), "{e}");
}

#[test]
fn accepts_every_reference_key_with_its_meaning() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["specs.json", "ca.pem", "crt.pem", "key.pem", "docker.json"] {
        std::fs::write(dir.path().join(f), "{}").unwrap();
    }
    let env = MapEnv(BTreeMap::from([("REDIS_PASSWORD".to_string(), "pw".to_string())]));
    let c = parse(
        r#"{"registry": {"port": 0, "prefix": "/mirror", "staticLayer": null,
             "remoteSpecProvider": {"addr": "dns:///ws-manager:8080", "tls": {"ca": "ca.pem", "crt": "crt.pem", "key": "key.pem"}},
             "fixedSpecFN": "specs.json", "store": "", "requireAuth": true,
             "tls": {"ca": "ca.pem", "crt": "crt.pem", "key": "key.pem"},
             "redis": {"enabled": true, "singleHostAddr": "redis.example:6380", "username": "facade",
                       "useTLS": true, "insecureSkipVerify": true},
             "ipfs": {"enabled": true, "ipfsAddr": "/dns4/ipfs.example/tcp/5001"}},
           "dockerAuth": "docker.json", "pprofAddr": "localhost:6060", "prometheusAddr": "",
           "readinessProbeAddr": null}"#,
        dir.path(),
        &env,
    )
    .unwrap();
    assert_eq!(c.prefix, "/mirror");
    assert!(c.static_layers.is_empty());
    assert_eq!(c.remote_spec_providers.len(), 1, "one provider object, as older installers wrote it");
    assert!(c.fixed_spec_file.is_some());
    assert_eq!(c.client_auth, ClientAuth::CredentialsPresent);
    assert_eq!(c.registry_tls_ca.as_deref(), Some("ca.pem"));
    let redis = c.cluster.redis.as_ref().unwrap();
    assert_eq!(
        (redis.username.as_deref(), redis.password.as_deref(), redis.tls, redis.insecure_skip_verify),
        (Some("facade"), Some("pw"), true, true)
    );
    assert_eq!((c.prometheus_addr, c.readiness_addr), (None, None));
    let notices = c.startup_notices().join("\n");
    for needle in [
        "pprofAddr \"localhost:6060\"",
        "registry.tls.ca \"ca.pem\": not read",
        "registry.requireAuth without facade.htpasswd",
    ] {
        assert!(notices.contains(needle), "{needle} missing from:\n{notices}");
    }

    // With facade.htpasswd, requireAuth keeps checking the file.
    std::fs::write(dir.path().join("htpasswd"), "").unwrap();
    let c = parse(
        r#"{"registry": {"fixedSpecFN": "specs.json", "requireAuth": true}, "facade": {"htpasswd": "htpasswd"}}"#,
        dir.path(),
        &env,
    )
    .unwrap();
    assert_eq!(c.client_auth, ClientAuth::Htpasswd(dir.path().join("htpasswd")));
    assert!(c.startup_notices().is_empty());
}

#[test]
fn typos_in_reference_keys_are_still_refused_by_name() {
    for (text, needle) in [
        (r#"{"registry": {"fixedSpecFN": "specs.json"}, "pprofAdr": "127.0.0.1:6060"}"#, "pprofAdr: unknown field"),
        (r#"{"registry": {"fixedSpecFN": "specs.json", "tls": {"cA": ""}}}"#, "registry.tls.cA: unknown field"),
        (
            r#"{"registry": {"fixedSpecFN": "specs.json", "redis": {"enabled": true, "singleHostAddr": "r:1", "insecureSkipverify": true}}}"#,
            "registry.redis.insecureSkipverify: unknown field",
        ),
        (
            r#"{"registry": {"remoteSpecProvider": {"addr": "h:1", "tsl": {}}}}"#,
            "registry.remoteSpecProvider.tsl: unknown field",
        ),
        (r#"{"registry": {"remoteSpecProvider": "h:1"}}"#, "registry.remoteSpecProvider: invalid type"),
        (r#"{"registry": {"fixedSpecFN": "specs.json"}, "facade": {"listenhost": "::1"}}"#, "facade.listenhost"),
    ] {
        let e = parse_str(text).unwrap_err().to_string();
        assert!(e.contains(needle), "{text}: {e}");
        assert!(!e.contains('\n'), "multi-line error: {e}");
    }
}

#[test]
fn the_environment_sets_the_listen_host_the_file_does_not() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("specs.json"), "{}").unwrap();
    let env = |v: &str| MapEnv(BTreeMap::from([(LISTEN_HOST_ENV.to_string(), v.to_string())]));
    let text = r#"{"registry": {"port": 31750, "fixedSpecFN": "specs.json"}}"#;
    assert_eq!(parse(text, dir.path(), &env("127.0.0.1")).unwrap().listen, "127.0.0.1:31750".parse().unwrap());
    assert_eq!(parse(text, dir.path(), &env("::1")).unwrap().listen, "[::1]:31750".parse().unwrap());
    assert_eq!(parse(text, dir.path(), &env("")).unwrap().listen, "0.0.0.0:31750".parse().unwrap());
    let e = parse(text, dir.path(), &env("localhost")).unwrap_err().to_string();
    assert!(e.contains(&format!("{LISTEN_HOST_ENV}: \"localhost\" is not an IP address")), "{e}");
    let with_key =
        r#"{"registry": {"port": 31750, "fixedSpecFN": "specs.json"}, "facade": {"listenHost": "10.1.1.1"}}"#;
    assert_eq!(parse(with_key, dir.path(), &env("127.0.0.1")).unwrap().listen, "10.1.1.1:31750".parse().unwrap());
}

#[test]
fn names_the_key_of_every_problem() {
    let cases = [
        (r#"{"registry": {"port": 70000}}"#, "registry.port"),
        (r#"{"registry": {"bogus": 1}}"#, "registry.bogus: unknown field `bogus`"),
        (
            r#"{"registry": {"fixedSpecFN": "specs.json", "staticLayer": [{"ref": "x", "type": "tarball"}]}}"#,
            "registry.staticLayer[0].type",
        ),
        (r#"{"registry": {"fixedSpecFN": "missing.json"}}"#, "registry.fixedSpecFN: cannot read"),
        (r#"{"registry": {"fixedSpecFN": "specs.json"}, "prometheusAddr": "nope"}"#, "prometheusAddr"),
        (r#"{"registry": {"fixedSpecFN": "specs.json"}, "facade": {"tagTTL": "soon"}}"#, "facade.tagTTL"),
        (r#"{"registry": {"fixedSpecFN": "specs.json"}, "facade": {"platform": "linux"}}"#, "facade.platform"),
        (r#"{"registry": {}}"#, "neither fixedSpecFN nor remoteSpecProvider"),
        (r#"["#, "EOF"),
    ];
    for (text, needle) in cases {
        let e = parse_str(text).unwrap_err().to_string();
        assert!(e.contains(needle), "{text}: {e}");
        assert!(!e.contains('\n'), "multi-line error: {e}");
    }
}

#[test]
fn reports_all_problems_at_once() {
    let e = parse_str(r#"{"registry": {"fixedSpecFN": "specs.json", "staticLayer": [{"ref": "UPPER", "type": "image"}]}, "prometheusAddr": "x", "facade": {"composeTTL": "y"}}"#)
        .unwrap_err();
    assert_eq!(e.0.len(), 3, "{e}");
}

#[test]
fn sizes_parse_with_binary_and_decimal_units() {
    for (s, n) in [
        ("0", 0),
        ("1048576", 1 << 20),
        ("512MiB", 512 << 20),
        ("20GiB", 20 << 30),
        ("1.5 GiB", 3 << 29),
        ("2TiB", 2 << 40),
        ("10KB", 10_000),
        ("3GB", 3_000_000_000),
        (" 7 B ", 7),
    ] {
        assert_eq!(parse_size(s), Ok(n), "{s}");
    }
    for bad in ["", "GiB", "12XB", "-1MiB", "1.2.3MiB", "99999999999TiB"] {
        assert!(parse_size(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn cluster_and_store_keys_have_defaults_and_read_the_environment() {
    let c = parse_str(
        r#"{"registry": {"fixedSpecFN": "specs.json", "redis": {"enabled": false}, "ipfs": {"enabled": false}}}"#,
    )
    .unwrap();
    assert_eq!(c.store_bounds.max_bytes, Some(20 << 30));
    assert_eq!(c.store_bounds.ttl, Some(Duration::from_secs(168 * 3600)));
    assert_eq!(c.cluster.tag_ttl, Duration::from_secs(300));
    assert!(c.cluster.redis.is_none() && c.cluster.ipfs.is_none());

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("specs.json"), "{}").unwrap();
    let env = MapEnv(BTreeMap::from([
        ("REDIS_PASSWORD".to_string(), "s3cret".to_string()),
        ("IPFS_HOST".to_string(), "10.1.2.3".to_string()),
    ]));
    let c = parse(
        r#"{"registry": {"fixedSpecFN": "specs.json",
            "redis": {"enabled": true, "singleHostAddr": "redis:6379", "username": "facade", "useTLS": true},
            "ipfs": {"enabled": true, "ipfsAddr": "/ip4/$IPFS_HOST/tcp/5001"}},
           "facade": {"storeMaxBytes": "512MiB", "storeTTL": "0s", "clusterTagTTL": "30s",
                      "clusterRedisTimeout": "250ms", "clusterIPFSTimeout": "2s"}}"#,
        dir.path(),
        &env,
    )
    .unwrap();
    let redis = c.cluster.redis.unwrap();
    assert_eq!(redis.addr, "redis:6379");
    assert_eq!(
        (redis.username.as_deref(), redis.password.as_deref(), redis.tls),
        (Some("facade"), Some("s3cret"), true)
    );
    assert_eq!(redis.timeout, Duration::from_millis(250));
    let ipfs = c.cluster.ipfs.unwrap();
    assert_eq!((ipfs.api.as_str(), ipfs.first_byte_timeout), ("http://10.1.2.3:5001", Duration::from_secs(2)));
    assert_eq!(
        (c.store_bounds.max_bytes, c.store_bounds.ttl, c.cluster.tag_ttl),
        (Some(512 << 20), None, Duration::from_secs(30))
    );

    let c = parse(
        r#"{"registry": {"fixedSpecFN": "specs.json"}, "facade": {"storeMaxBytes": 1073741824}}"#,
        dir.path(),
        &env,
    )
    .unwrap();
    assert_eq!(c.store_bounds.max_bytes, Some(1 << 30));
    let c = parse(r#"{"registry": {"fixedSpecFN": "specs.json"}, "facade": {"storeMaxBytes": 0}}"#, dir.path(), &env)
        .unwrap();
    assert_eq!(c.store_bounds.max_bytes, None, "0 means unbounded");
}

#[test]
fn names_every_cluster_problem_at_once() {
    let e = parse_str(
        r#"{"registry": {"fixedSpecFN": "specs.json",
            "redis": {"enabled": true, "singleHostAddr": "redis"},
            "ipfs": {"enabled": true, "ipfsAddr": "/ip4/$IPFS_HOST/tcp/5001"}},
           "facade": {"storeMaxBytes": "20 GB-ish", "storeTTL": "a week", "clusterTagTTL": "0s"}}"#,
    )
    .unwrap_err();
    let text = e.to_string();
    for needle in [
        "registry.redis.singleHostAddr",
        "registry.ipfs.ipfsAddr: \"/ip4/$IPFS_HOST/tcp/5001\" uses $IPFS_HOST, which is not set",
        "facade.storeMaxBytes",
        "facade.storeTTL",
        "facade.clusterTagTTL: must be more than 0",
    ] {
        assert!(text.contains(needle), "{needle} missing from: {text}");
    }
    assert!(!text.contains('\n'));
    let e = parse_str(
        r#"{"registry": {"fixedSpecFN": "specs.json", "ipfs": {"enabled": true, "ipfsAddr": "/ip4/1.2.3.4/udp/1"}},
           "facade": {"storeMaxBytes": true}}"#,
    )
    .unwrap_err()
    .to_string();
    for needle in ["registry.ipfs.ipfsAddr", "registry.ipfs.enabled: IPFS needs registry.redis", "facade.storeMaxBytes"]
    {
        assert!(e.contains(needle), "{needle} missing from: {e}");
    }
}

#[test]
fn parses_remote_spec_providers() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["ca.pem", "crt.pem", "key.pem"] {
        std::fs::write(dir.path().join(f), "x").unwrap();
    }
    let c = parse(
        r#"{"registry": {"remoteSpecProvider": [
              {"addr": "dns:///ws-manager:8080", "tls": {"ca": "ca.pem", "crt": "crt.pem", "key": "key.pem"}},
              {"addr": "127.0.0.1:9000", "tls": {"ca": "ca.pem"}},
              {"addr": "127.0.0.1:9001"}]},
           "facade": {"specTimeout": "750ms", "specCacheTTL": "0s", "specServerName": "spec.test", "specCacheSize": 5}}"#,
        dir.path(),
        &MapEnv::default(),
    )
    .unwrap();
    let p = &c.remote_spec_providers;
    assert_eq!(p.len(), 3);
    assert_eq!(p[0].addr, "dns:///ws-manager:8080");
    let tls = p[0].tls.as_ref().unwrap();
    assert_eq!(tls.ca, dir.path().join("ca.pem"));
    assert_eq!(tls.identity, Some((dir.path().join("crt.pem"), dir.path().join("key.pem"))));
    assert!(p[1].tls.as_ref().unwrap().identity.is_none());
    assert!(p[2].tls.is_none());
    assert_eq!(c.spec.grpc.timeout, Duration::from_millis(750));
    assert_eq!(c.spec.cache.ttl, Duration::ZERO);
    assert_eq!(c.spec.cache.negative_ttl, Duration::from_secs(2));
    assert_eq!(c.spec.cache.stale_for, Duration::from_secs(3600));
    assert_eq!((c.spec.cache.max_entries, c.spec.server_name.as_str()), (5, "spec.test"));
    assert!(c.fixed_spec_file.is_none());

    let c = parse_str(r#"{"registry": {"fixedSpecFN": "specs.json"}}"#).unwrap();
    assert!(c.remote_spec_providers.is_empty());
    assert_eq!((c.spec.grpc.timeout, c.spec.server_name.as_str()), (Duration::from_secs(5), "ws-manager"));
}

#[test]
fn names_every_remote_spec_provider_problem_at_once() {
    let e = parse_str(
        r#"{"registry": {"remoteSpecProvider": [
              {"addr": "unix:///run/ws.sock"},
              {"addr": ""},
              {"addr": "h:1", "tls": {"crt": "specs.json"}},
              {"addr": "h:1", "tls": {"ca": "missing.pem"}},
              {"addr": "https://h:1"}]},
           "facade": {"specTimeout": "0s", "specNegativeTTL": "later", "specServerName": "a b"}}"#,
    )
    .unwrap_err();
    let text = e.to_string();
    for needle in [
        "registry.remoteSpecProvider[0].addr",
        "registry.remoteSpecProvider[1].addr",
        "registry.remoteSpecProvider[2].tls.ca: required",
        "registry.remoteSpecProvider[2].tls: crt and key",
        "registry.remoteSpecProvider[3].tls.ca: cannot read",
        "registry.remoteSpecProvider[4].addr",
        "facade.specTimeout",
        "facade.specNegativeTTL",
        "facade.specServerName",
    ] {
        assert!(text.contains(needle), "{needle} missing from: {text}");
    }
    assert!(!text.contains('\n'));
    let e = parse_str(r#"{"registry": {"remoteSpecProvider": [{"addr": "h:1", "bogus": 1}]}}"#).unwrap_err();
    assert!(e.to_string().contains("registry.remoteSpecProvider[0].bogus"), "{e}");
}

#[test]
fn request_limits_have_defaults_and_parse() {
    let c = parse_str(r#"{"registry": {"fixedSpecFN": "specs.json"}}"#).unwrap();
    assert_eq!(c.limits, RequestLimits::default());
    assert_eq!(c.limits.max_requests_per_client, 256);
    assert_eq!(c.limits.response_idle_timeout, Some(Duration::from_secs(300)));

    let c = parse_str(
        r#"{"registry": {"fixedSpecFN": "specs.json"},
           "facade": {"maxRequestHeaderBytes": "128KiB", "maxURLBytes": 4096, "maxRequestsPerClient": 0,
                      "responseIdleTimeout": "0s"}}"#,
    )
    .unwrap();
    assert_eq!(
        c.limits,
        RequestLimits {
            max_header_bytes: 128 << 10,
            max_url_bytes: 4096,
            max_requests_per_client: 0,
            response_idle_timeout: None,
            ..RequestLimits::default()
        }
    );
}

#[test]
fn connection_limits_have_defaults_parse_and_name_bad_values() {
    let c = parse_str(r#"{"registry": {"fixedSpecFN": "specs.json"}}"#).unwrap();
    assert_eq!(c.limits.request_head_timeout, Some(Duration::from_secs(30)));
    assert_eq!(c.limits.idle_connection_timeout, Some(Duration::from_secs(60)));
    assert_eq!(
        (c.limits.max_connections, c.limits.auth_failures_per_second, c.limits.auth_check_threads),
        (4096, 10, 2)
    );
    let c = parse_str(
        r#"{"registry": {"fixedSpecFN": "specs.json"},
           "facade": {"requestHeadTimeout": "5s", "idleConnectionTimeout": "0s", "maxConnections": 0,
                      "authFailuresPerSecond": 3, "authCheckThreads": 1}}"#,
    )
    .unwrap();
    assert_eq!(c.limits.request_head_timeout, Some(Duration::from_secs(5)));
    assert_eq!(c.limits.idle_connection_timeout, None);
    assert_eq!((c.limits.max_connections, c.limits.auth_failures_per_second, c.limits.auth_check_threads), (0, 3, 1));
    let mut server = facade_server::ServerConfig::default();
    c.limits.apply_to(&mut server);
    assert_eq!((server.request_head_timeout, server.idle_connection_timeout), (Some(Duration::from_secs(5)), None));
    assert_eq!((server.max_connections, server.auth_failures_per_second, server.auth_check_threads), (0, 3, 1));
    let e = parse_str(
        r#"{"registry": {"fixedSpecFN": "specs.json"},
           "facade": {"requestHeadTimeout": "soon", "idleConnectionTimeout": "later", "authCheckThreads": 0,
                      "authFailuresPerSecond": 99999999999}}"#,
    )
    .unwrap_err()
    .to_string();
    for key in ["requestHeadTimeout", "idleConnectionTimeout", "authCheckThreads", "authFailuresPerSecond"] {
        assert!(e.contains(&format!("facade.{key}")), "{key}: {e}");
    }
}

#[test]
fn names_every_request_limit_problem_at_once() {
    let e = parse_str(
        r#"{"registry": {"fixedSpecFN": "specs.json"},
           "facade": {"maxRequestHeaderBytes": "4KiB", "maxURLBytes": "lots", "maxRequestsPerClient": -1,
                      "responseIdleTimeout": "10s"}}"#,
    )
    .unwrap_err();
    // maxRequestsPerClient: -1 is a type error, reported alone by the JSON decoder.
    assert!(e.to_string().contains("facade.maxRequestsPerClient"), "{e}");

    let e = parse_str(
        r#"{"registry": {"fixedSpecFN": "specs.json"},
           "facade": {"maxRequestHeaderBytes": "4KiB", "maxURLBytes": "lots", "responseIdleTimeout": "10s"}}"#,
    )
    .unwrap_err();
    let text = e.to_string();
    for needle in [
        "facade.maxRequestHeaderBytes: 4096 is outside 8KiB..1MiB",
        "facade.maxURLBytes: \"lots\"",
        "facade.responseIdleTimeout: 10s is not more than facade.upstreamReadTimeout (15s)",
    ] {
        assert!(text.contains(needle), "{needle} missing from: {text}");
    }
    assert_eq!(e.0.len(), 3, "{text}");
    assert!(!text.contains('\n'));

    for (facade, needle) in [
        (r#"{"maxURLBytes": 100}"#, "facade.maxURLBytes: 100 is less than 1KiB"),
        (r#"{"maxURLBytes": "128KiB"}"#, "facade.maxURLBytes: 131072 is more than facade.maxRequestHeaderBytes"),
        (r#"{"maxRequestHeaderBytes": true}"#, "facade.maxRequestHeaderBytes: true is neither"),
        (r#"{"responseIdleTimeout": "soon"}"#, "facade.responseIdleTimeout: \"soon\""),
        (
            r#"{"responseIdleTimeout": "20s", "upstreamReadTimeout": "30s"}"#,
            "facade.responseIdleTimeout: 20s is not more than facade.upstreamReadTimeout (30s)",
        ),
    ] {
        let text = format!(r#"{{"registry": {{"fixedSpecFN": "specs.json"}}, "facade": {facade}}}"#);
        let e = parse_str(&text).unwrap_err().to_string();
        assert!(e.contains(needle), "{facade}: {e}");
    }
}

/// The `facade` keys' table of the README: key → default, as written there.
fn readme_facade_defaults() -> Vec<(String, String)> {
    let readme = include_str!("../../../../README.md");
    let table = readme.split("a `facade` section of our own").nth(1).expect("the README's facade table");
    table
        .lines()
        .skip_while(|l| !l.starts_with("| `"))
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_string(), cells[2].trim_matches('`').to_string())
        })
        .collect()
}

/// Every default the README's table shows is the one a file without a `facade` section gets:
/// the defaults live in the crates' `Default`s, and this keeps the documentation in step.
#[test]
fn the_readme_shows_the_defaults_an_empty_facade_section_gets() {
    let c = parse_str(
        r#"{"registry": {"fixedSpecFN": "specs.json", "redis": {"enabled": true, "singleHostAddr": "redis:6379"},
            "ipfs": {"enabled": true, "ipfsAddr": "/ip4/127.0.0.1/tcp/5001"}}}"#,
    )
    .unwrap();
    let (redis, ipfs) = (c.cluster.redis.as_ref().unwrap(), c.cluster.ipfs.as_ref().unwrap());
    let rows = readme_facade_defaults();
    assert_eq!(rows.len(), 51, "the README's facade table, one row per key: {rows:?}");
    for (key, doc) in &rows {
        let dur = || humantime::parse_duration(doc).unwrap_or_else(|e| panic!("{key}: {doc:?}: {e}"));
        let size = || usize::try_from(parse_size(doc).unwrap()).unwrap();
        let at_most = |d: Option<Duration>| d.unwrap_or(Duration::ZERO);
        match key.as_str() {
            "listenHost" => assert_eq!(c.listen.ip().to_string(), *doc),
            "platform" => assert_eq!((doc.as_str(), &c.fetch.platform), ("this host's", &facade_oci::Platform::host())),
            "composeTTL" => assert_eq!(c.images.compose_ttl, dur()),
            "tagTTL" => assert_eq!(c.fetch.tag_ttl, dur()),
            "plainHTTPHosts" => assert!(doc == "[]" && c.upstream.plain_http_hosts.is_empty()),
            "upstreamConnectTimeout" => assert_eq!(c.upstream.connect_timeout, dur()),
            "upstreamMetadataTimeout" => assert_eq!(c.upstream.metadata_timeout, dur()),
            "upstreamReadTimeout" => assert_eq!(c.upstream.read_timeout, dur()),
            "upstreamCA" => assert!(doc == "—" && c.upstream.extra_ca_pem.is_none()),
            "upstreamDenyNetworks" => assert!(doc == "[]" && c.upstream_deny_networks.is_empty()),
            "storeMaxBytes" => assert_eq!(c.store_bounds.max_bytes, Some(parse_size(doc).unwrap())),
            "storeTTL" => assert_eq!(at_most(c.store_bounds.ttl), dur()),
            "maxBlobBytes" => assert!(
                doc == "storeMaxBytes / 4" && c.store_bounds.max_blob_bytes == c.store_bounds.max_bytes.map(|m| m / 4)
            ),
            "unreadFillGrace" => assert_eq!(c.store_bounds.unread_grace, dur()),
            "clusterTagTTL" => assert_eq!(c.cluster.tag_ttl, dur()),
            "clusterRedisTimeout" => assert_eq!(redis.timeout, dur()),
            "clusterIPFSTimeout" => assert_eq!(ipfs.first_byte_timeout, dur()),
            "clusterIndexTTL" => assert_eq!(c.cluster.index_ttl, dur()),
            "clusterIPFSMaxBytes" => assert!(doc == "0" && c.cluster.ipfs_max_bytes.is_none()),
            "specTimeout" => assert_eq!(c.spec.grpc.timeout, dur()),
            "specCacheTTL" => assert_eq!(c.spec.cache.ttl, dur()),
            "specNegativeTTL" => assert_eq!(c.spec.cache.negative_ttl, dur()),
            "specStaleTTL" => assert_eq!(c.spec.cache.stale_for, dur()),
            "specCacheSize" => assert_eq!(c.spec.cache.max_entries.to_string(), *doc),
            "specServerName" => assert_eq!(c.spec.server_name, *doc),
            "htpasswd" => assert!(doc == "—" && c.client_auth == ClientAuth::Off),
            "shutdownGrace" => assert_eq!(c.shutdown_grace, dur()),
            "maxRequestHeaderBytes" => assert_eq!(c.limits.max_header_bytes, size()),
            "maxURLBytes" => assert_eq!(c.limits.max_url_bytes, size()),
            "maxRequestsPerClient" => assert_eq!(c.limits.max_requests_per_client.to_string(), *doc),
            "responseIdleTimeout" => assert_eq!(at_most(c.limits.response_idle_timeout), dur()),
            "requestHeadTimeout" => assert_eq!(at_most(c.limits.request_head_timeout), dur()),
            "idleConnectionTimeout" => assert_eq!(at_most(c.limits.idle_connection_timeout), dur()),
            "maxConnections" => assert_eq!(c.limits.max_connections.to_string(), *doc),
            "authFailuresPerSecond" => assert_eq!(c.limits.auth_failures_per_second.to_string(), *doc),
            "authCheckThreads" => assert_eq!(c.limits.auth_check_threads.to_string(), *doc),
            "maxBufferedResponseBytes" => {
                assert_eq!(c.memory.max_buffered_response_bytes, parse_size(doc).unwrap())
            }
            "imageCacheBytes" => {
                assert_eq!(
                    (c.images.max_bytes, c.fetch.max_bytes),
                    (parse_size(doc).unwrap(), parse_size(doc).unwrap())
                )
            }
            "specCacheBytes" => assert_eq!(c.spec.cache.max_bytes, parse_size(doc).unwrap()),
            "legacyMetrics" => assert_eq!(c.legacy_metrics.to_string(), *doc),
            "prefetchParallelism" => assert_eq!(c.prefetch.parallelism.to_string(), *doc),
            "blockingReadThreads" => assert_eq!(c.lanes.reads.to_string(), *doc),
            "blockingSpoolWriteThreads" => assert_eq!(c.lanes.spool_writes.to_string(), *doc),
            "blockingCommitThreads" => assert_eq!(c.lanes.commits.to_string(), *doc),
            "blockingHousekeepingThreads" => assert_eq!(c.lanes.housekeeping.to_string(), *doc),
            "prefetchIdleTimeout" => assert_eq!(c.prefetch.idle_timeout, dur()),
            "peerAddr" | "peerSecretFile" => assert!(doc == "—" && c.peer.is_none()),
            "peerAdvertiseAddr" => assert_eq!(doc, "peerAddr"),
            "peerMaxFollowers" => assert_eq!(super::peer::DEFAULT_MAX_FOLLOWERS.to_string(), *doc),
            "peerLeaseTTL" => assert_eq!(super::peer::DEFAULT_LEASE_TTL, dur()),
            other => panic!("the README documents facade.{other}; add its default to this test"),
        }
    }
}

#[test]
fn upstream_deny_networks_parse_and_name_bad_entries() {
    let c = parse_str(r#"{"registry": {"fixedSpecFN": "specs.json"}, "facade": {"upstreamDenyNetworks": ["127.0.0.0/8", "::1", "10.1.2.3"]}}"#)
        .unwrap();
    let denied = &c.upstream_deny_networks;
    assert_eq!(denied.len(), 3);
    assert!(denied[0].contains("127.9.9.9".parse().unwrap()) && denied[1].contains("::1".parse().unwrap()));
    assert!(denied[2].contains("10.1.2.3".parse().unwrap()) && !denied[2].contains("10.1.2.4".parse().unwrap()));
    let err = parse_str(
        r#"{"registry": {"fixedSpecFN": "specs.json"}, "facade": {"upstreamDenyNetworks": ["10.0.0.0/33", "nope"]}}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("facade.upstreamDenyNetworks") && err.contains("10.0.0.0/33") && err.contains("nope"),
        "{err}"
    );
}

#[test]
fn blocking_lane_keys_parse_and_bad_values_are_named() {
    let c = parse_str(
        r#"{"registry": {"fixedSpecFN": "specs.json"}, "facade": {"blockingReadThreads": 32, "blockingCommitThreads": 1}}"#,
    )
    .unwrap();
    assert_eq!((c.lanes.reads, c.lanes.spool_writes, c.lanes.commits, c.lanes.housekeeping), (32, 8, 1, 2));
    assert_eq!(c.lanes.threads(), 43);
    let err = parse_str(
        r#"{"registry": {"fixedSpecFN": "specs.json"}, "facade": {"blockingSpoolWriteThreads": 0, "blockingHousekeepingThreads": 257}}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("facade.blockingSpoolWriteThreads: 0 is outside 1..256"), "{err}");
    assert!(err.contains("facade.blockingHousekeepingThreads: 257 is outside 1..256"), "{err}");
}

#[test]
fn prefetch_keys_parse_and_bad_values_are_named() {
    let c = parse_str(
        r#"{"registry": {"fixedSpecFN": "specs.json"}, "facade": {"prefetchParallelism": 0, "prefetchIdleTimeout": "2s"}}"#,
    )
    .unwrap();
    assert_eq!((c.prefetch.parallelism, c.prefetch.idle_timeout), (0, Duration::from_secs(2)));
    let err = parse_str(
        r#"{"registry": {"fixedSpecFN": "specs.json"}, "facade": {"prefetchParallelism": 65, "prefetchIdleTimeout": "0s"}}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("facade.prefetchParallelism: 65 is more than 64"), "{err}");
    assert!(err.contains("facade.prefetchIdleTimeout: must be more than 0"), "{err}");
}

#[test]
fn max_blob_bytes_defaults_to_a_quarter_of_the_budget_and_unread_fill_grace_parses() {
    let c = parse_str(
        r#"{"registry": {"fixedSpecFN": "specs.json"},
            "facade": {"storeMaxBytes": "128MiB", "unreadFillGrace": "2s"}}"#,
    )
    .unwrap();
    assert_eq!(c.store_bounds.max_blob_bytes, Some(32 << 20));
    assert_eq!(c.store_bounds.unread_grace, Duration::from_secs(2));
    let c = parse_str(
        r#"{"registry": {"fixedSpecFN": "specs.json"}, "facade": {"storeMaxBytes": "1GiB", "maxBlobBytes": "700MiB"}}"#,
    )
    .unwrap();
    assert_eq!(c.store_bounds.max_blob_bytes, Some(700 << 20));
    // 0: as large as the budget; an unbounded store keeps blobs of any size.
    let c = parse_str(r#"{"registry": {"fixedSpecFN": "specs.json"}, "facade": {"maxBlobBytes": 0}}"#).unwrap();
    assert_eq!(c.store_bounds.max_blob_bytes, None);
    let c = parse_str(r#"{"registry": {"fixedSpecFN": "specs.json"}, "facade": {"storeMaxBytes": 0}}"#).unwrap();
    assert_eq!(c.store_bounds.max_blob_bytes, None);
    let e = parse_str(
        r#"{"registry": {"fixedSpecFN": "specs.json"}, "facade": {"maxBlobBytes": "huge", "unreadFillGrace": "0s"}}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("facade.maxBlobBytes") && e.contains("facade.unreadFillGrace"), "{e}");
}
