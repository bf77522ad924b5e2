//! Composed workspace images pulled with a real client (skopeo) from the facade, with
//! the base and add-on images on a real upstream registry (CNCF distribution).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use base64::Engine as _;
use e2e::Facade;
use e2e::http::request;
use serde_json::{Value, json};
use test_support::image::SKOPEO_TIMEOUT;
use test_support::image::{
    BuiltImage, FileEntry, ImageBuilder, LayerCompression, PushFormat, build_layer, build_tar, gzip, push_image,
    push_index, sha256_digest,
};
use test_support::proc::run_bytes;
use test_support::registry::Registry;
use test_support::skopeo;

const SKIP_N: &str = "skip-n.registry-facade.gitpod.io";

fn base_image(name: &str) -> BuiltImage {
    ImageBuilder::new()
        .layer(build_layer(&[FileEntry::file("etc/base-1", format!("{name} layer 1"))], LayerCompression::Gzip))
        .layer(build_layer(&[FileEntry::file("etc/base-2", format!("{name} layer 2"))], LayerCompression::Gzip))
        .env(["PATH=/usr/bin:/bin", "EDITOR=vi", "KEEP=1", "NOEQUALS"])
        .run_config_extra("Healthcheck", json!({"Test": ["CMD", "true"], "Interval": 1000000000}))
        .run_config_extra("OnBuild", json!(["RUN echo hi"]))
        .config_extra("container_config", json!({"Hostname": "builder"}))
        .config_extra("docker_version", json!("24.0.7"))
        .created("2023-05-06T07:08:09Z")
        .build()
}

struct World {
    reg: Registry,
    dir: tempfile::TempDir,
    static_file_digest: String,
}

/// Pushes every image the specs name and writes specs, static layer file and returns the world.
fn world() -> World {
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let host = reg.host();

    push_image(&reg, "base/docker:latest", &base_image("docker"), PushFormat::DockerV2S2).unwrap();
    push_image(&reg, "base/oci:latest", &base_image("oci"), PushFormat::Oci).unwrap();

    let ide = ImageBuilder::new()
        .layer(build_layer(&[FileEntry::file("ide/skipped", "the IDE image's own base")], LayerCompression::Gzip))
        .layer(build_layer(&[FileEntry::exec("ide/bin/ide", "#!/bin/sh\n")], LayerCompression::Gzip))
        .env([
            "GITPOD_ENV_APPEND_PATH=/ide/bin:",
            "GITPOD_ENV_SET_EDITOR=code",
            "GITPOD_ENV_PREPEND_KEEP=:x",
            "GITPOD_ENV_APPEND_=ignored",
            "OTHER=ignored",
        ])
        .label(SKIP_N, "1")
        .build();
    push_image(&reg, "ide/code:1", &ide, PushFormat::Oci).unwrap();
    let supervisor = ImageBuilder::new()
        .layer(build_layer(&[FileEntry::exec(".supervisor/supervisor", "#!/bin/sh\n")], LayerCompression::Gzip))
        .env(["GITPOD_ENV_SET_SUPERVISOR=1", "GITPOD_ENV_APPEND_PATH=/.supervisor:"])
        .build();
    push_image(&reg, "supervisor:1", &supervisor, PushFormat::DockerV2S2).unwrap();
    let ide_layer = ImageBuilder::new()
        .layer(build_layer(&[FileEntry::file("ide/extra/plugin", "plugin")], LayerCompression::Gzip))
        .build();
    push_image(&reg, "ide/extra:1", &ide_layer, PushFormat::Oci).unwrap();
    let static_image = ImageBuilder::new()
        .layer(build_layer(&[FileEntry::file("static/from-image", "static image")], LayerCompression::Gzip))
        .build();
    push_image(&reg, "static/tools:1", &static_image, PushFormat::Oci).unwrap();

    let static_tar = gzip(&build_tar(&[FileEntry::file("static/from-file", "static file")]));
    std::fs::write(dir.path().join("static.tar.gz"), &static_tar).unwrap();

    let content = build_tar(&[FileEntry::file("workspace/content.txt", "workspace content")]);
    let spec = |base: &str| {
        json!({
            "baseRef": format!("{host}/{base}"),
            "ideRef": format!("{host}/ide/code:1"),
            "supervisorRef": format!("{host}/supervisor:1"),
            "ideLayerRef": [format!("{host}/ide/extra:1")],
            "contentLayer": [{"direct": {"content": base64::engine::general_purpose::STANDARD.encode(&content)}}]
        })
    };
    let specs = json!({
        "ws-docker": spec("base/docker:latest"),
        "ws-oci": spec("base/oci:latest"),
        // The id `make run` serves and tells the user to inspect.
        "demo": spec("base/docker:latest"),
        "ws-multiarch": {"baseRef": format!("{host}/base/multi:latest")},
    });
    std::fs::write(dir.path().join("specs.json"), specs.to_string()).unwrap();
    World { reg, dir, static_file_digest: sha256_digest(&static_tar) }
}

fn config(w: &World) -> Value {
    json!({
        "registry": {
            "port": 0,
            "store": "store",
            "fixedSpecFN": "specs.json",
            "staticLayer": [
                {"ref": format!("{}/static/tools:1", w.reg.host()), "type": "image"},
                {"ref": "static.tar.gz", "type": "file"}
            ]
        },
        "facade": {"listenHost": "127.0.0.1", "platform": "linux/amd64"}
    })
}

fn pull(facade: &Facade, id: &str) -> skopeo::PulledImage {
    let out = tempfile::tempdir().unwrap();
    let image = format!("{}/fixed/{id}:latest", facade.host());
    skopeo::copy_to_oci_preserving_digests(&image, out.path(), "latest").unwrap();
    skopeo::read_oci_layout(out.path(), "latest").unwrap()
}

fn env_map(config: &Value) -> BTreeMap<String, String> {
    config["config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let s = e.as_str().unwrap();
            let (k, v) = s.split_once('=').unwrap_or((s, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn check_composed(facade: &Facade, w: &World, id: &str, docker: bool) {
    let img = pull(facade, id);
    let layers = img.manifest["layers"].as_array().unwrap();
    // base 2 + static image 1 + static file 1 + ide 2-1 (skip-n) + supervisor 1 + ide layer 1 + content 1
    let expected_files = [
        "etc/base-1",
        "etc/base-2",
        "static/from-image",
        "static/from-file",
        "ide/bin/ide",
        ".supervisor/supervisor",
        "ide/extra/plugin",
        "workspace/content.txt",
    ];
    assert_eq!(layers.len(), expected_files.len(), "{id}: {}", img.manifest);
    for (i, f) in expected_files.iter().enumerate() {
        assert!(img.layer_files[i].contains_key(*f), "{id}: layer {i} lacks {f}: {:?}", img.layer_files[i].keys());
    }
    assert!(!img.rootfs().contains_key("ide/skipped"), "skip-n layer was included");
    assert_eq!(layers[3]["digest"], w.static_file_digest);

    // One family throughout.
    let mt = img.manifest["mediaType"].as_str().unwrap();
    let prefix = if docker { "application/vnd.docker." } else { "application/vnd.oci." };
    assert!(mt.starts_with(prefix), "{mt}");
    assert!(img.manifest["config"]["mediaType"].as_str().unwrap().starts_with(prefix));
    for l in layers {
        assert!(l["mediaType"].as_str().unwrap().starts_with(prefix), "{l}");
    }
    // ws-daemon reads the workspace-image annotations from every manifest, Docker schema 2
    // included (the reference writes them into both families).
    let a = &img.manifest["annotations"];
    let base_ref = if docker { "base/docker" } else { "base/oci" };
    assert_eq!(a["io.gitpod.workspace-image.ref"], format!("{}/{base_ref}:latest", w.reg.host()), "{id}");
    let base_size: u64 = layers[..2].iter().map(|l| l["size"].as_u64().unwrap()).sum();
    assert_eq!(a["io.gitpod.workspace-image.size"], base_size.to_string(), "{id}");

    // Config: diff_ids and history in step with layers, env edited, unknown fields kept.
    let raw_config = skopeo::inspect_config_raw(&format!("{}/fixed/{id}:latest", facade.host())).unwrap();
    let cfg: Value = serde_json::from_slice(&raw_config).unwrap();
    assert_eq!(cfg["rootfs"]["diff_ids"].as_array().unwrap().len(), layers.len());
    let non_empty = cfg["history"].as_array().unwrap().iter().filter(|h| h["empty_layer"] != json!(true)).count();
    assert_eq!(non_empty, layers.len(), "{}", cfg["history"]);
    assert_eq!(cfg["created"], "2023-05-06T07:08:09Z");
    assert_eq!(cfg["config"]["Healthcheck"]["Test"], json!(["CMD", "true"]));
    assert_eq!(cfg["config"]["OnBuild"], json!(["RUN echo hi"]));
    assert_eq!(cfg["container_config"]["Hostname"], "builder");
    assert_eq!(cfg["docker_version"], "24.0.7");
    let env = env_map(&cfg);
    assert_eq!(env["PATH"], "/.supervisor:/ide/bin:/usr/bin:/bin");
    assert_eq!(env["EDITOR"], "code");
    assert_eq!(env["KEEP"], "1:x");
    assert_eq!(env["SUPERVISOR"], "1");
    assert!(!env.contains_key("OTHER"));
    let env_list: Vec<&str> = cfg["config"]["Env"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(&env_list[..4], &["PATH=/.supervisor:/ide/bin:/usr/bin:/bin", "EDITOR=code", "KEEP=1:x", "NOEQUALS"]);

    // HEAD by tag and GET by digest agree, and the bytes hash to the digest.
    let head = request(&facade.host(), "HEAD", &format!("/v2/fixed/{id}/manifests/latest"), &[], b"");
    assert_eq!(head.status, 200);
    let digest = head.header("docker-content-digest").unwrap().to_string();
    assert_eq!(head.header("content-length").unwrap(), img.manifest_bytes.len().to_string());
    let get = request(&facade.host(), "GET", &format!("/v2/fixed/{id}/manifests/{digest}"), &[], b"");
    assert_eq!(get.status, 200);
    assert_eq!(get.header("docker-content-digest").unwrap(), digest);
    assert_eq!(sha256_digest(&get.body), digest);
    assert_eq!(get.body, img.manifest_bytes);
    assert_eq!(get.header("content-type").unwrap(), mt);
}

#[test]
fn composes_docker_and_oci_bases_with_every_kind_of_layer() {
    let w = world();
    let facade = Facade::start(&config(&w), w.dir.path()).unwrap();
    check_composed(&facade, &w, "ws-docker", true);
    check_composed(&facade, &w, "ws-oci", false);
}

/// `skopeo inspect docker://<facade>/fixed/demo:latest` (what `make run` suggests) lists the
/// repository's tags before it reads the manifest and config: the tags route must answer.
#[test]
fn skopeo_inspect_and_list_tags_work() {
    let w = world();
    let facade = Facade::start(&config(&w), w.dir.path()).unwrap();
    let h = facade.host();
    for id in ["demo", "ws-oci"] {
        let mut cmd = std::process::Command::new("skopeo");
        cmd.args(["--insecure-policy", "inspect", "--tls-verify=false"]).arg(format!("docker://{h}/fixed/{id}:latest"));
        let out: Value = serde_json::from_slice(&run_bytes(cmd, SKOPEO_TIMEOUT).unwrap()).unwrap();
        assert_eq!(out["RepoTags"], json!(["latest"]), "{id}: {out}");
        assert_eq!(out["Name"], format!("{h}/fixed/{id}"), "{id}: {out}");
        let head = request(&h, "HEAD", &format!("/v2/fixed/{id}/manifests/latest"), &[], b"");
        assert_eq!(out["Digest"], head.header("docker-content-digest").unwrap(), "{id}: {out}");
        assert_eq!(out["Layers"].as_array().unwrap().len(), 8, "{id}: {out}");
        let env: Vec<&str> = out["Env"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert!(env.contains(&"EDITOR=code"), "{id}: {env:?}");

        let mut cmd = std::process::Command::new("skopeo");
        cmd.args(["--insecure-policy", "list-tags", "--tls-verify=false"]).arg(format!("docker://{h}/fixed/{id}"));
        let tags: Value = serde_json::from_slice(&run_bytes(cmd, SKOPEO_TIMEOUT).unwrap()).unwrap();
        assert_eq!(tags["Tags"], json!(["latest"]), "{id}: {tags}");
    }

    let list = request(&h, "GET", "/v2/fixed/demo/tags/list", &[], b"");
    assert_eq!(list.status, 200);
    assert_eq!(serde_json::from_slice::<Value>(&list.body).unwrap(), json!({"name": "fixed/demo", "tags": ["latest"]}));
    let head = request(&h, "HEAD", "/v2/fixed/demo/tags/list", &[], b"");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length").unwrap(), list.body.len().to_string());
    let paged = request(&h, "GET", "/v2/fixed/demo/tags/list?n=1&last=a", &[], b"");
    assert_eq!(serde_json::from_slice::<Value>(&paged.body).unwrap()["tags"], json!(["latest"]));
    let past = request(&h, "GET", "/v2/fixed/demo/tags/list?last=latest", &[], b"");
    assert_eq!(serde_json::from_slice::<Value>(&past.body).unwrap()["tags"], json!([]));
    for unknown in ["/v2/fixed/nope/tags/list", "/v2/nope/demo/tags/list"] {
        let r = request(&h, "GET", unknown, &[], b"");
        assert_eq!(r.status, 404, "{unknown}");
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["errors"][0]["code"], "NAME_UNKNOWN", "{unknown}: {v}");
        assert_eq!(request(&h, "HEAD", unknown, &[], b"").status, 404, "{unknown}");
    }
}

#[test]
fn picks_the_platform_from_an_index_base_and_skips_attestations() {
    let w = world();
    let amd = ImageBuilder::new()
        .platform("linux", "amd64", None)
        .layer(build_layer(&[FileEntry::file("arch", "amd64")], LayerCompression::Gzip))
        .build();
    let arm = ImageBuilder::new()
        .platform("linux", "arm64", Some("v8"))
        .layer(build_layer(&[FileEntry::file("arch", "arm64")], LayerCompression::Gzip))
        .build();
    let platform = |s: &str| facade_oci::Platform::parse(s).unwrap();
    push_index(
        &w.reg,
        "base/multi:latest",
        &[(platform("linux/arm64/v8"), &arm), (platform("linux/amd64"), &amd)],
        true,
        PushFormat::Oci,
    )
    .unwrap();
    for (plat, want) in [("linux/amd64", "amd64"), ("linux/arm64", "arm64")] {
        let mut cfg = config(&w);
        cfg["facade"]["platform"] = json!(plat);
        cfg["registry"]["staticLayer"] = json!([]);
        let facade = Facade::start(&cfg, w.dir.path()).unwrap();
        let raw = request(&facade.host(), "GET", "/v2/fixed/ws-multiarch/manifests/latest", &[], b"");
        assert_eq!(raw.status, 200, "{}", String::from_utf8_lossy(&raw.body));
        let m: Value = serde_json::from_slice(&raw.body).unwrap();
        let layer = m["layers"][0]["digest"].as_str().unwrap();
        let blob = request(&facade.host(), "GET", &format!("/v2/fixed/ws-multiarch/blobs/{layer}"), &[], b"");
        assert_eq!(blob.status, 200);
        let files = skopeo::layer_files_of(&blob.body, m["layers"][0]["mediaType"].as_str().unwrap()).unwrap();
        assert_eq!(files["arch"], want.as_bytes(), "{plat}");
        let cfg_digest = m["config"]["digest"].as_str().unwrap();
        let c = request(&facade.host(), "GET", &format!("/v2/fixed/ws-multiarch/blobs/{cfg_digest}"), &[], b"");
        let c: Value = serde_json::from_slice(&c.body).unwrap();
        assert_eq!(c["architecture"], want);
    }
}

#[test]
fn answers_errors_the_way_clients_expect() {
    let w = world();
    let facade = Facade::start(&config(&w), w.dir.path()).unwrap();
    let h = facade.host();
    // The node-labeler readiness probe.
    let r = request(&h, "GET", "/v2/remote/not-a-valid-image/manifests/latest", &[], b"");
    assert_eq!((r.status, r.error_code().as_deref()), (404, Some("MANIFEST_UNKNOWN")));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let r = request(&h, "GET", "/v2/fixed/no-such-workspace/manifests/latest", &[], b"");
    assert_eq!((r.status, r.error_code().as_deref()), (404, Some("MANIFEST_UNKNOWN")));
    let r = request(&h, "GET", &format!("/v2/fixed/ws-oci/blobs/sha256:{}", "0".repeat(64)), &[], b"");
    assert_eq!((r.status, r.error_code().as_deref()), (404, Some("BLOB_UNKNOWN")));
    let r = request(&h, "GET", &format!("/v2/fixed/ws-oci/manifests/sha256:{}", "0".repeat(64)), &[], b"");
    assert_eq!((r.status, r.error_code().as_deref()), (404, Some("MANIFEST_UNKNOWN")));
    let r = request(&h, "PUT", "/v2/fixed/ws-oci/manifests/latest", &[("Content-Type", "application/json")], b"{}");
    assert_eq!(r.status, 400);
    let r = request(&h, "GET", "/v2/fixed/ws-oci/blobs/sha256:totallywrong", &[], b"");
    assert_eq!((r.status, r.error_code().as_deref()), (400, Some("DIGEST_INVALID")));

    // A layer of ws-docker's base is not a blob of ws-oci... but ws-oci's own content layer is
    // found only under its own name.
    let m: Value =
        serde_json::from_slice(&request(&h, "GET", "/v2/fixed/ws-docker/manifests/latest", &[], b"").body).unwrap();
    let docker_base_layer = m["layers"][0]["digest"].as_str().unwrap();
    let r = request(&h, "GET", &format!("/v2/fixed/ws-oci/blobs/{docker_base_layer}"), &[], b"");
    assert_eq!((r.status, r.error_code().as_deref()), (404, Some("BLOB_UNKNOWN")), "cross-workspace read");
    let r = request(&h, "GET", &format!("/v2/fixed/ws-docker/blobs/{docker_base_layer}"), &[], b"");
    assert_eq!(r.status, 200);

    // A base image missing upstream.
    let mut specs: Value = serde_json::from_slice(&std::fs::read(w.dir.path().join("specs.json")).unwrap()).unwrap();
    specs["ws-missing"] = json!({"baseRef": format!("{}/base/nope:latest", w.reg.host())});
    std::fs::write(w.dir.path().join("specs.json"), specs.to_string()).unwrap();
    drop(facade);
    let facade = Facade::start(&config(&w), w.dir.path()).unwrap();
    let r = request(&facade.host(), "GET", "/v2/fixed/ws-missing/manifests/latest", &[], b"");
    assert_eq!(
        (r.status, r.error_code().as_deref()),
        (404, Some("MANIFEST_UNKNOWN")),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
}

#[test]
fn blobs_are_served_from_the_local_store_after_the_first_pull() {
    let w = world();
    let facade = Facade::start(&config(&w), w.dir.path()).unwrap();
    let h = facade.host();
    let m: Value =
        serde_json::from_slice(&request(&h, "GET", "/v2/fixed/ws-oci/manifests/latest", &[], b"").body).unwrap();
    let layer = m["layers"][0]["digest"].as_str().unwrap().to_string();
    let first = request(&h, "GET", &format!("/v2/fixed/ws-oci/blobs/{layer}"), &[], b"");
    assert_eq!(first.status, 200);
    assert_eq!(sha256_digest(&first.body), layer);
    let stored = w.dir.path().join("store/blobs/sha256").join(layer.trim_start_matches("sha256:"));
    // The fill commits after the last byte was verified; allow it a moment, bounded.
    test_support::wait::until("the blob to be back-filled into the store", std::time::Duration::from_secs(10), || {
        stored.exists()
    });
    // With the upstream gone, the stored blob still serves (HEAD and GET, with its headers).
    let mut w = w;
    w.reg.stop();
    let head = request(&h, "HEAD", &format!("/v2/fixed/ws-oci/blobs/{layer}"), &[], b"");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length").unwrap(), first.body.len().to_string());
    assert_eq!(head.header("docker-content-digest").unwrap(), layer);
    let again = request(&h, "GET", &format!("/v2/fixed/ws-oci/blobs/{layer}"), &[("Range", "bytes=1-")], b"");
    assert_eq!(again.status, 206);
    assert_eq!(again.body, first.body[1..]);
}
