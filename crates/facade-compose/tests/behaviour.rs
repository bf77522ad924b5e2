//! Behaviour of `compose` on small built images: the rules one by one and every error path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{config, digest, image, json, layer, simple_image};
use facade_compose::{
    Addition, BaseInput, Composed, Error, LayerInput, LayerOrigin, REF_ANNOTATION, SIZE_ANNOTATION, SKIP_N_LABEL,
    compose,
};
use facade_oci::media_types::{self as mt, Compression};
use serde_json::{Value, json};

const REF: &str = "registry.example/base:1";

fn base<'a>(manifest: &'a [u8], media_type: &'a str, config: &'a [u8]) -> BaseInput<'a> {
    BaseInput { base_ref: REF, manifest, manifest_media_type: media_type, config }
}

fn docker_base() -> (Vec<u8>, Vec<u8>) {
    simple_image(mt::DOCKER_MANIFEST, mt::DOCKER_LAYER_GZIP, "base", 2, Some(&["PATH=/bin"]), None)
}

fn oci_base() -> (Vec<u8>, Vec<u8>) {
    simple_image(mt::OCI_MANIFEST, mt::OCI_LAYER_GZIP, "base", 2, Some(&["PATH=/bin"]), None)
}

fn compose_ok(b: &BaseInput<'_>, additions: &[Addition<'_>]) -> Composed {
    compose(b, additions).unwrap_or_else(|e| panic!("compose failed: {e}"))
}

fn gz_layer(seed: &str) -> LayerInput {
    LayerInput {
        digest: digest(seed),
        diff_id: digest(&format!("{seed}-diff")),
        size: 42,
        compression: Compression::Gzip,
    }
}

fn addition_label(err: Error) -> (String, String) {
    match err {
        Error::InvalidAddition { label, reason } => (label, reason),
        other => panic!("expected InvalidAddition, got {other:?}"),
    }
}

#[test]
fn no_additions_keeps_layers_and_config_content() {
    let (m, c) = docker_base();
    let out = compose_ok(&base(&m, mt::DOCKER_MANIFEST, &c), &[]);
    assert_eq!(json(&out.config), json(&c));
    assert_eq!(json(&out.manifest)["layers"], json(&m)["layers"]);
    assert_eq!(out.layers.len(), 2);
    assert!(out.layers.iter().all(|l| l.origin == LayerOrigin::Base));
}

#[test]
fn layer_order_follows_addition_order_and_origins_index_the_slice() {
    let (m, c) = oci_base();
    let (im, ic) = simple_image(mt::OCI_MANIFEST, mt::OCI_LAYER_GZIP, "img", 2, None, None);
    let additions = [
        Addition::Layer { label: "static", layer: gz_layer("static") },
        Addition::Image { label: "ide", manifest: &im, manifest_media_type: mt::OCI_MANIFEST, config: &ic },
        Addition::Layer { label: "content", layer: gz_layer("content") },
    ];
    let out = compose_ok(&base(&m, mt::OCI_MANIFEST, &c), &additions);
    let origins: Vec<LayerOrigin> = out.layers.iter().map(|l| l.origin).collect();
    let (b, a) = (LayerOrigin::Base, LayerOrigin::Addition);
    assert_eq!(origins, [b, b, a(0), a(1), a(1), a(2)]);
    let digests: Vec<_> = out.layers.iter().map(|l| l.digest.clone()).collect();
    assert_eq!(
        digests,
        [digest("base-0"), digest("base-1"), digest("static"), digest("img-0"), digest("img-1"), digest("content")]
    );
    let cfg = json(&out.config);
    let ids: Vec<&str> = cfg["rootfs"]["diff_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [
            digest("base-diff-0").to_string(),
            digest("base-diff-1").to_string(),
            digest("static-diff").to_string(),
            digest("img-diff-0").to_string(),
            digest("img-diff-1").to_string(),
            digest("content-diff").to_string(),
        ]
    );
    let created_by: Vec<&str> =
        cfg["history"].as_array().unwrap().iter().map(|h| h["created_by"].as_str().unwrap()).collect();
    assert_eq!(
        created_by,
        [
            "step 0",
            "step 1",
            "registry-facade: static",
            "registry-facade: ide",
            "registry-facade: ide",
            "registry-facade: content"
        ]
    );
    for h in &cfg["history"].as_array().unwrap()[2..] {
        assert_eq!(h["created"], "2024-01-01T00:00:00Z");
        assert!(h.get("empty_layer").is_none());
    }
}

#[test]
fn skip_n_drops_first_layers_and_diff_ids() {
    let (m, c) = oci_base();
    for (n, kept) in [("0", 3), ("1", 2), ("2", 1), ("3", 0), ("4", 0), ("65535", 0)] {
        let (im, ic) =
            simple_image(mt::OCI_MANIFEST, mt::OCI_LAYER_GZIP, "img", 3, None, Some(json!({ SKIP_N_LABEL: n })));
        let additions =
            [Addition::Image { label: "ide", manifest: &im, manifest_media_type: mt::OCI_MANIFEST, config: &ic }];
        let out = compose_ok(&base(&m, mt::OCI_MANIFEST, &c), &additions);
        let added: Vec<_> = out.layers[2..].iter().map(|l| l.digest.clone()).collect();
        let want: Vec<_> = (3 - kept..3).map(|i| digest(&format!("img-{i}"))).collect();
        assert_eq!(added, want, "skip-n {n}");
        let ids = json(&out.config)["rootfs"]["diff_ids"].as_array().unwrap().clone();
        let want_ids: Vec<Value> = (0..2)
            .map(|i| json!(digest(&format!("base-diff-{i}")).to_string()))
            .chain((3 - kept..3).map(|i| json!(digest(&format!("img-diff-{i}")).to_string())))
            .collect();
        assert_eq!(ids, want_ids, "skip-n {n}");
    }
}

#[test]
fn invalid_skip_n_is_an_invalid_addition_naming_label_and_value() {
    let (m, c) = oci_base();
    // The reference reads the label as an unsigned 16-bit decimal: no sign, at most 65535.
    for bad in ["abc", "-1", "", "1.0", "+1", "65536", "999999999999999999999"] {
        let (im, ic) =
            simple_image(mt::OCI_MANIFEST, mt::OCI_LAYER_GZIP, "img", 2, None, Some(json!({ SKIP_N_LABEL: bad })));
        let additions =
            [Addition::Image { label: "ide_ref", manifest: &im, manifest_media_type: mt::OCI_MANIFEST, config: &ic }];
        let err = compose(&base(&m, mt::OCI_MANIFEST, &c), &additions).unwrap_err();
        assert!(!err.is_retryable());
        let (label, reason) = addition_label(err);
        assert_eq!(label, "ide_ref");
        assert!(reason.contains(SKIP_N_LABEL), "{reason}");
        assert!(reason.contains(&format!("{bad:?}")), "{reason}");
    }
}

#[test]
fn env_rules_apply_from_images_only_in_order() {
    let (m, c) = simple_image(
        mt::OCI_MANIFEST,
        mt::OCI_LAYER_GZIP,
        "base",
        1,
        Some(&["PATH=/usr/bin", "HOME=/root", "NOEQUALS"]),
        None,
    );
    let (am, ac) = simple_image(
        mt::OCI_MANIFEST,
        mt::OCI_LAYER_GZIP,
        "a",
        1,
        Some(&["GITPOD_ENV_APPEND_PATH=/a:", "HOME=/ignored", "GITPOD_ENV_SET_NEW=1"]),
        None,
    );
    let (bm, bc) = simple_image(
        mt::DOCKER_MANIFEST,
        mt::DOCKER_LAYER_GZIP,
        "b",
        1,
        Some(&["GITPOD_ENV_APPEND_PATH=/b:", "GITPOD_ENV_PREPEND_PATH=:/z", "GITPOD_ENV_SET_HOME=/home/x"]),
        None,
    );
    let additions = [
        Addition::Image { label: "a", manifest: &am, manifest_media_type: mt::OCI_MANIFEST, config: &ac },
        Addition::Layer { label: "l", layer: gz_layer("l") },
        Addition::Image { label: "b", manifest: &bm, manifest_media_type: mt::DOCKER_MANIFEST, config: &bc },
    ];
    let out = compose_ok(&base(&m, mt::OCI_MANIFEST, &c), &additions);
    assert_eq!(
        json(&out.config)["config"]["Env"],
        json!(["PATH=/b:/a:/usr/bin:/z", "HOME=/home/x", "NOEQUALS", "NEW=1"])
    );
}

#[test]
fn no_env_key_is_added_when_nothing_is_set() {
    // Base without `config` at all, and with `config` but without Env.
    let mut no_run = config("base", 1, None, None);
    no_run.as_object_mut().unwrap().remove("config");
    for cfg in [no_run, config("base", 1, None, None)] {
        let (m, c) = image(Some(mt::OCI_MANIFEST), vec![layer(mt::OCI_LAYER_GZIP, "base-0", 1)], &cfg);
        let (im, ic) = simple_image(
            mt::OCI_MANIFEST,
            mt::OCI_LAYER_GZIP,
            "img",
            1,
            Some(&["FOO=bar", "GITPOD_ENV_APPEND_X="]),
            None,
        );
        let additions =
            [Addition::Image { label: "i", manifest: &im, manifest_media_type: mt::OCI_MANIFEST, config: &ic }];
        let out = json(&compose_ok(&base(&m, mt::OCI_MANIFEST, &c), &additions).config);
        assert_eq!(out.get("config"), cfg.get("config"));
    }
}

#[test]
fn env_key_is_created_when_base_has_none() {
    let mut cfg = config("base", 1, None, None);
    cfg.as_object_mut().unwrap().remove("config");
    let (m, c) = image(Some(mt::OCI_MANIFEST), vec![layer(mt::OCI_LAYER_GZIP, "base-0", 1)], &cfg);
    let (im, ic) = simple_image(mt::OCI_MANIFEST, mt::OCI_LAYER_GZIP, "img", 1, Some(&["GITPOD_ENV_SET_A=1"]), None);
    let additions = [Addition::Image { label: "i", manifest: &im, manifest_media_type: mt::OCI_MANIFEST, config: &ic }];
    let out = json(&compose_ok(&base(&m, mt::OCI_MANIFEST, &c), &additions).config);
    assert_eq!(out["config"], json!({"Env": ["A=1"]}));
}

#[test]
fn null_env_stays_null_when_nothing_is_set() {
    let mut cfg = config("base", 1, None, None);
    cfg["config"] = json!({"Env": null, "Cmd": ["sh"]});
    let (m, c) = image(Some(mt::OCI_MANIFEST), vec![layer(mt::OCI_LAYER_GZIP, "base-0", 1)], &cfg);
    let out = json(
        &compose_ok(&base(&m, mt::OCI_MANIFEST, &c), &[Addition::Layer { label: "l", layer: gz_layer("l") }]).config,
    );
    assert_eq!(out["config"], json!({"Env": null, "Cmd": ["sh"]}));
}

#[test]
fn history_entries_omit_created_when_base_has_none() {
    let mut cfg = config("base", 1, None, None);
    cfg.as_object_mut().unwrap().remove("created");
    let (m, c) = image(Some(mt::OCI_MANIFEST), vec![layer(mt::OCI_LAYER_GZIP, "base-0", 1)], &cfg);
    let out = json(
        &compose_ok(&base(&m, mt::OCI_MANIFEST, &c), &[Addition::Layer { label: "l", layer: gz_layer("l") }]).config,
    );
    assert_eq!(out["history"][1], json!({"created_by": "registry-facade: l"}));
    assert!(out.get("created").is_none());
}

#[test]
fn history_is_started_only_on_an_empty_base() {
    // A base with layers and no history: starting a history with only our entries would make
    // it disagree with the layer count, so none is added.
    let mut cfg = config("base", 1, None, None);
    cfg.as_object_mut().unwrap().remove("history");
    let (m, c) = image(Some(mt::OCI_MANIFEST), vec![layer(mt::OCI_LAYER_GZIP, "base-0", 1)], &cfg);
    let out = json(
        &compose_ok(&base(&m, mt::OCI_MANIFEST, &c), &[Addition::Layer { label: "l", layer: gz_layer("l") }]).config,
    );
    assert!(out.get("history").is_none());

    // A scratch base (no layers, no history) gets one entry per added layer.
    let mut cfg = config("scratch", 0, None, None);
    cfg.as_object_mut().unwrap().remove("history");
    let (m, c) = image(Some(mt::OCI_MANIFEST), vec![], &cfg);
    let out = json(
        &compose_ok(&base(&m, mt::OCI_MANIFEST, &c), &[Addition::Layer { label: "l", layer: gz_layer("l") }]).config,
    );
    assert_eq!(out["history"], json!([{"created": "2024-01-01T00:00:00Z", "created_by": "registry-facade: l"}]));
}

#[test]
fn rootfs_type_is_forced_to_layers() {
    let mut cfg = config("base", 1, None, None);
    cfg["rootfs"]["type"] = json!("something");
    let (m, c) = image(Some(mt::OCI_MANIFEST), vec![layer(mt::OCI_LAYER_GZIP, "base-0", 1)], &cfg);
    let out = json(&compose_ok(&base(&m, mt::OCI_MANIFEST, &c), &[]).config);
    assert_eq!(out["rootfs"]["type"], "layers");
}

#[test]
fn docker_family_is_kept_and_added_layers_relabelled_without_layer_annotations() {
    let (m, c) = docker_base();
    let mut l = layer(mt::OCI_LAYER_GZIP, "img-0", 7);
    l["annotations"] = json!({"a": "b"});
    l["urls"] = json!(["https://example.invalid/x"]);
    let (im, ic) =
        image(Some(mt::OCI_MANIFEST), vec![l, layer(mt::OCI_LAYER_TAR, "img-1", 8)], &config("img", 2, None, None));
    let additions = [
        Addition::Image { label: "i", manifest: &im, manifest_media_type: mt::OCI_MANIFEST, config: &ic },
        Addition::Layer {
            label: "t",
            layer: LayerInput { digest: digest("t"), diff_id: digest("t"), size: 1, compression: Compression::None },
        },
    ];
    let out = compose_ok(&base(&m, mt::DOCKER_MANIFEST, &c), &additions);
    assert_eq!(out.manifest_media_type, mt::DOCKER_MANIFEST);
    let man = json(&out.manifest);
    assert_eq!(man["mediaType"], mt::DOCKER_MANIFEST);
    assert_eq!(man["config"]["mediaType"], mt::DOCKER_CONFIG);
    // The manifest carries the workspace-image annotations (ws-daemon reads them from Docker
    // manifests too); the added layer descriptors do not keep theirs.
    assert_eq!(man["annotations"][SIZE_ANNOTATION], json!(m_layer_total(&m).to_string()));
    assert_eq!(man["annotations"][REF_ANNOTATION], REF);
    let layers = man["layers"].as_array().unwrap();
    assert_eq!(
        layers[2],
        json!({"mediaType": mt::DOCKER_LAYER_GZIP, "digest": digest("img-0").to_string(), "size": 7, "urls": ["https://example.invalid/x"]})
    );
    assert_eq!(layers[3]["mediaType"], mt::DOCKER_LAYER_TAR);
    assert_eq!(layers[4], json!({"mediaType": mt::DOCKER_LAYER_TAR, "digest": digest("t").to_string(), "size": 1}));
    let types: Vec<&str> = out.layers.iter().map(|l| l.media_type.as_str()).collect();
    assert_eq!(
        types,
        [
            mt::DOCKER_LAYER_GZIP,
            mt::DOCKER_LAYER_GZIP,
            mt::DOCKER_LAYER_GZIP,
            mt::DOCKER_LAYER_TAR,
            mt::DOCKER_LAYER_TAR
        ]
    );
}

#[test]
fn zstd_in_an_image_layer_converts_docker_to_oci() {
    let mut cfg = config("base", 3, None, None);
    cfg["Healthcheck"] = json!({"Test": ["NONE"]});
    let foreign = {
        let mut l = layer(mt::DOCKER_LAYER_FOREIGN, "base-1", 2);
        l["urls"] = json!(["https://foreign.invalid/l"]);
        l
    };
    let (m, c) = image(
        Some(mt::DOCKER_MANIFEST),
        vec![layer(mt::DOCKER_LAYER_GZIP, "base-0", 1), foreign, layer(mt::DOCKER_LAYER_TAR, "base-2", 3)],
        &cfg,
    );
    let (im, ic) = simple_image(mt::OCI_MANIFEST, mt::OCI_LAYER_ZSTD, "img", 1, None, None);
    let additions = [Addition::Image { label: "z", manifest: &im, manifest_media_type: mt::OCI_MANIFEST, config: &ic }];
    let out = compose_ok(&base(&m, mt::DOCKER_MANIFEST, &c), &additions);
    assert_eq!(out.manifest_media_type, mt::OCI_MANIFEST);
    let man = json(&out.manifest);
    assert_eq!(man["mediaType"], mt::OCI_MANIFEST);
    assert_eq!(man["config"]["mediaType"], mt::OCI_CONFIG);
    let types: Vec<&str> = man["layers"].as_array().unwrap().iter().map(|l| l["mediaType"].as_str().unwrap()).collect();
    assert_eq!(types, [mt::OCI_LAYER_GZIP, mt::OCI_LAYER_NONDIST_GZIP, mt::OCI_LAYER_TAR, mt::OCI_LAYER_ZSTD]);
    assert_eq!(man["layers"][1]["urls"], json!(["https://foreign.invalid/l"]));
    assert_eq!(man["annotations"][SIZE_ANNOTATION], "6");
    assert_eq!(man["annotations"][REF_ANNOTATION], REF);
    assert_eq!(json(&out.config)["Healthcheck"], json!({"Test": ["NONE"]}));
}

#[test]
fn skipped_zstd_layers_do_not_convert_the_family() {
    let (m, c) = docker_base();
    let (im, ic) = image(
        Some(mt::OCI_MANIFEST),
        vec![layer(mt::OCI_LAYER_ZSTD, "img-0", 1), layer(mt::OCI_LAYER_GZIP, "img-1", 1)],
        &config("img", 2, None, Some(json!({ SKIP_N_LABEL: "1" }))),
    );
    let additions = [Addition::Image { label: "i", manifest: &im, manifest_media_type: mt::OCI_MANIFEST, config: &ic }];
    let out = compose_ok(&base(&m, mt::DOCKER_MANIFEST, &c), &additions);
    assert_eq!(out.manifest_media_type, mt::DOCKER_MANIFEST);
}

#[test]
fn zstd_layer_input_converts_docker_to_oci() {
    let (m, c) = docker_base();
    let layer = LayerInput { digest: digest("z"), diff_id: digest("zd"), size: 5, compression: Compression::Zstd };
    let out = compose_ok(&base(&m, mt::DOCKER_MANIFEST, &c), &[Addition::Layer { label: "z", layer }]);
    assert_eq!(out.manifest_media_type, mt::OCI_MANIFEST);
    assert_eq!(out.layers[2].media_type, mt::OCI_LAYER_ZSTD);
    assert_eq!(out.layers[0].media_type, mt::OCI_LAYER_GZIP);
}

#[test]
fn oci_annotations_are_merged_and_created() {
    let (m, c) = oci_base();
    let mut man = json(&m);
    man["annotations"] = json!({"keep": "me", SIZE_ANNOTATION: "stale"});
    let m2 = serde_json::to_vec(&man).unwrap();
    let out = json(&compose_ok(&base(&m2, mt::OCI_MANIFEST, &c), &[]).manifest);
    // Base layer sizes are 100 and 101.
    assert_eq!(out["annotations"], json!({"keep": "me", SIZE_ANNOTATION: "201", REF_ANNOTATION: REF}));

    man["annotations"] = Value::Null;
    let m3 = serde_json::to_vec(&man).unwrap();
    let out = json(&compose_ok(&base(&m3, mt::OCI_MANIFEST, &c), &[]).manifest);
    assert_eq!(out["annotations"], json!({SIZE_ANNOTATION: "201", REF_ANNOTATION: REF}));
}

#[test]
fn media_type_comes_from_the_transport_when_the_document_has_none() {
    let (m, c) = image(None, vec![layer(mt::DOCKER_LAYER_GZIP, "base-0", 1)], &config("base", 1, None, None));
    let out = compose_ok(&base(&m, mt::DOCKER_MANIFEST, &c), &[]);
    assert_eq!(out.manifest_media_type, mt::DOCKER_MANIFEST);
    let man = json(&out.manifest);
    let keys: Vec<&String> = man.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["schemaVersion", "mediaType", "config", "layers", "annotations"]);
    assert_eq!(man["config"]["mediaType"], mt::DOCKER_CONFIG);
}

#[test]
fn config_descriptor_loses_data_and_urls_but_keeps_other_fields() {
    let (m, c) = oci_base();
    let mut man = json(&m);
    man["config"]["data"] = json!("e30=");
    man["config"]["urls"] = json!(["https://x.invalid/c"]);
    man["config"]["annotations"] = json!({"k": "v"});
    man["subject"] = json!({"mediaType": mt::OCI_MANIFEST, "digest": digest("s").to_string(), "size": 1});
    man["artifactType"] = json!("application/x-thing");
    man["x-unknown"] = json!(1);
    let m2 = serde_json::to_vec(&man).unwrap();
    let out = compose_ok(&base(&m2, mt::OCI_MANIFEST, &c), &[]);
    let o = json(&out.manifest);
    assert_eq!(
        o["config"],
        json!({"mediaType": mt::OCI_CONFIG, "digest": out.config_digest.to_string(), "size": out.config.len(), "annotations": {"k": "v"}})
    );
    assert!(o.get("subject").is_none() && o.get("artifactType").is_none());
    assert_eq!(o["x-unknown"], 1);
}

#[test]
fn index_base_is_rejected() {
    let idx = json!({"schemaVersion": 2, "mediaType": mt::OCI_INDEX, "manifests": []});
    let idx = serde_json::to_vec(&idx).unwrap();
    let (_, c) = oci_base();
    let err = compose(&base(&idx, mt::OCI_INDEX, &c), &[]).unwrap_err();
    assert!(matches!(&err, Error::InvalidBase { reason } if reason.contains("index")), "{err}");
}

#[test]
fn index_addition_is_rejected() {
    let (m, c) = oci_base();
    let idx = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": mt::DOCKER_MANIFEST_LIST, "manifests": []}))
        .unwrap();
    let additions = [Addition::Image {
        label: "ide_ref",
        manifest: &idx,
        manifest_media_type: mt::DOCKER_MANIFEST_LIST,
        config: b"{}",
    }];
    let (label, reason) = addition_label(compose(&base(&m, mt::OCI_MANIFEST, &c), &additions).unwrap_err());
    assert_eq!(label, "ide_ref");
    assert!(reason.contains("index"), "{reason}");
}

#[test]
fn unknown_added_layer_media_type_is_rejected() {
    let (m, c) = oci_base();
    let (im, ic) = simple_image(mt::OCI_MANIFEST, "application/vnd.example.weird", "img", 1, None, None);
    let additions =
        [Addition::Image { label: "odd", manifest: &im, manifest_media_type: mt::OCI_MANIFEST, config: &ic }];
    let (label, reason) = addition_label(compose(&base(&m, mt::OCI_MANIFEST, &c), &additions).unwrap_err());
    assert_eq!(label, "odd");
    assert!(reason.contains("application/vnd.example.weird"), "{reason}");
}

#[test]
fn added_image_with_layer_and_diff_id_count_mismatch_is_rejected() {
    let (m, c) = oci_base();
    let (im, ic) =
        image(Some(mt::OCI_MANIFEST), vec![layer(mt::OCI_LAYER_GZIP, "i", 1)], &config("img", 2, None, None));
    let additions = [Addition::Image { label: "i", manifest: &im, manifest_media_type: mt::OCI_MANIFEST, config: &ic }];
    let (_, reason) = addition_label(compose(&base(&m, mt::OCI_MANIFEST, &c), &additions).unwrap_err());
    assert!(reason.contains("1 layers") && reason.contains("2 diff_ids"), "{reason}");
}

#[test]
fn config_that_does_not_match_its_descriptor_is_rejected() {
    let (m, _) = oci_base();
    let other = serde_json::to_vec(&config("base", 2, Some(&["X=1"]), None)).unwrap();
    let err = compose(&base(&m, mt::OCI_MANIFEST, &other), &[]).unwrap_err();
    assert!(matches!(err, Error::InvalidBase { .. }), "{err}");

    let (m, c) = oci_base();
    let (im, _) = simple_image(mt::OCI_MANIFEST, mt::OCI_LAYER_GZIP, "img", 1, None, None);
    let additions = [Addition::Image { label: "i", manifest: &im, manifest_media_type: mt::OCI_MANIFEST, config: &c }];
    addition_label(compose(&base(&m, mt::OCI_MANIFEST, &c), &additions).unwrap_err());
}

#[test]
fn base_without_rootfs_or_with_mismatched_diff_ids_is_rejected() {
    let mut cfg = config("base", 1, None, None);
    cfg.as_object_mut().unwrap().remove("rootfs");
    let (m, c) = image(Some(mt::OCI_MANIFEST), vec![], &cfg);
    let err = compose(&base(&m, mt::OCI_MANIFEST, &c), &[]).unwrap_err();
    assert!(matches!(&err, Error::InvalidBase { reason } if reason.contains("rootfs")), "{err}");

    let (m, c) = image(Some(mt::OCI_MANIFEST), vec![layer(mt::OCI_LAYER_GZIP, "b", 1)], &config("base", 2, None, None));
    let err = compose(&base(&m, mt::OCI_MANIFEST, &c), &[]).unwrap_err();
    assert!(matches!(err, Error::InvalidBase { .. }), "{err}");
}

#[test]
fn uncompressed_layer_input_must_have_its_digest_as_diff_id() {
    let (m, c) = oci_base();
    let layer = LayerInput { digest: digest("a"), diff_id: digest("b"), size: 1, compression: Compression::None };
    let (label, _) = addition_label(
        compose(&base(&m, mt::OCI_MANIFEST, &c), &[Addition::Layer { label: "content", layer }]).unwrap_err(),
    );
    assert_eq!(label, "content");
}

#[test]
fn garbage_inputs_are_invalid_input_not_panics() {
    let (m, c) = oci_base();
    for bad in [&b""[..], b"null", b"[]", b"{}", b"\xff\xfe", br#"{"schemaVersion":1}"#, br#"{"schemaVersion":2}"#] {
        let err = compose(&base(bad, mt::OCI_MANIFEST, &c), &[]).unwrap_err();
        assert!(matches!(err, Error::InvalidBase { .. }) && !err.is_retryable() && err.is_invalid_input());
        let additions =
            [Addition::Image { label: "g", manifest: bad, manifest_media_type: mt::OCI_MANIFEST, config: bad }];
        addition_label(compose(&base(&m, mt::OCI_MANIFEST, &c), &additions).unwrap_err());
    }
}

#[test]
fn unknown_and_docker_only_config_keys_keep_value_and_order() {
    let mut cfg = serde_json::Map::new();
    cfg.insert("zzz".into(), json!({"nested": [1, 2.5, null, "x"]}));
    cfg.insert("container_config".into(), json!({"Hostname": "abc", "Cmd": ["/bin/sh"]}));
    for (k, v) in config("base", 1, Some(&["A=1"]), None).as_object().unwrap() {
        cfg.insert(k.clone(), v.clone());
    }
    cfg.insert("docker_version".into(), json!("20.10.7"));
    cfg.insert("aaa".into(), json!(false));
    let cfg = Value::Object(cfg);
    let (m, c) = image(Some(mt::OCI_MANIFEST), vec![layer(mt::OCI_LAYER_GZIP, "base-0", 1)], &cfg);
    let out = json(
        &compose_ok(&base(&m, mt::OCI_MANIFEST, &c), &[Addition::Layer { label: "l", layer: gz_layer("l") }]).config,
    );
    let keys_in: Vec<&String> = cfg.as_object().unwrap().keys().collect();
    let keys_out: Vec<&String> = out.as_object().unwrap().keys().collect();
    assert_eq!(keys_in, keys_out);
    for k in ["zzz", "container_config", "docker_version", "aaa", "created", "architecture", "os", "config"] {
        assert_eq!(out[k], cfg[k], "{k}");
    }
}

/// Sum of the layer sizes of a manifest document.
fn m_layer_total(manifest: &[u8]) -> u64 {
    json(manifest)["layers"].as_array().unwrap().iter().map(|l| l["size"].as_u64().unwrap()).sum()
}
