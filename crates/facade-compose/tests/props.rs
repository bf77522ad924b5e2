//! Property tests of `compose` (the README's "Composition": pure, the same inputs give the same bytes): purity, history/diff_id/layer counts, base
//! layers verbatim and first, unknown config keys surviving, one media-type family, and no
//! panics on arbitrary input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{digest, json};
use facade_compose::{
    Addition, BaseInput, Composed, LayerInput, LayerOrigin, REF_ANNOTATION, SIZE_ANNOTATION, SKIP_N_LABEL, compose,
};
use facade_oci::Digest;
use facade_oci::media_types::{self as mt, Compression, Family};
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

#[derive(Clone, Debug)]
struct LayerSpec {
    /// 0 = tar, 1 = gzip, 2 = non-distributable gzip, 3 = zstd (OCI only)
    kind: u8,
    seed: u32,
    size: u64,
    annotations: bool,
    urls: bool,
}

#[derive(Clone, Debug)]
struct BaseSpec {
    docker: bool,
    media_type_in_doc: bool,
    layers: Vec<LayerSpec>,
    /// `empty_layer` flags of extra history entries; `None` = no history key
    history: Option<Vec<bool>>,
    created: bool,
    env: Option<Vec<String>>,
    extra: Vec<(String, Value)>,
    manifest_extra: Vec<(String, Value)>,
}

#[derive(Clone, Debug)]
enum AddSpec {
    Image { docker: bool, layers: Vec<(Compression, u32, u64)>, skip: Option<u8>, env: Vec<String> },
    Layer { compression: Compression, seed: u32, size: u64 },
}

fn arb_compression() -> impl Strategy<Value = Compression> {
    prop_oneof![Just(Compression::None), Just(Compression::Gzip), Just(Compression::Zstd)]
}

fn arb_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1.0e12f64..1.0e12).prop_map(Value::from),
        "[ -~]{0,12}".prop_map(Value::from),
    ]
}

fn arb_json() -> impl Strategy<Value = Value> {
    arb_leaf().prop_recursive(3, 32, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            btree_map("[a-zA-Z_]{1,8}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn arb_env_var() -> impl Strategy<Value = String> {
    (
        prop_oneof![Just("GITPOD_ENV_SET_"), Just("GITPOD_ENV_APPEND_"), Just("GITPOD_ENV_PREPEND_"), Just("")],
        prop_oneof![Just(""), Just("PATH"), Just("A"), Just("B")],
        prop_oneof![Just(""), Just("x"), Just("/y:"), Just(":/z")],
    )
        .prop_map(|(p, n, v)| format!("{p}{n}={v}"))
}

/// Config keys the generator must not use as "unknown" keys.
const KNOWN_KEYS: &[&str] = &["created", "architecture", "os", "config", "rootfs", "history"];

fn arb_base() -> impl Strategy<Value = BaseSpec> {
    (
        any::<bool>(),
        any::<bool>(),
        vec((0u8..4, any::<u32>(), 0u64..1 << 40, any::<bool>(), any::<bool>()), 0..5),
        proptest::option::of(vec(any::<bool>(), 0..4)),
        any::<bool>(),
        proptest::option::of(vec("[A-Z]{1,3}=[a-z/:]{0,6}", 0..4)),
        vec(("[a-zA-Z_.]{1,12}", arb_json()), 0..4),
        vec(("x-[a-z]{1,6}", arb_json()), 0..2),
    )
        .prop_map(|(docker, media_type_in_doc, layers, history, created, env, extra, manifest_extra)| BaseSpec {
            docker,
            // An OCI document may omit its mediaType (the transport supplies it); a Docker one
            // must carry it.
            media_type_in_doc: docker || media_type_in_doc,
            layers: layers
                .into_iter()
                .map(|(kind, seed, size, annotations, urls)| LayerSpec {
                    // Docker has no zstd type.
                    kind: if docker { kind % 3 } else { kind },
                    seed,
                    size,
                    annotations: annotations && !docker,
                    urls,
                })
                .collect(),
            history,
            created,
            env,
            extra: {
                // Distinct names: a repeated key would be overwritten while building the config.
                let mut seen = std::collections::HashSet::new();
                extra.into_iter().filter(|(k, _)| !KNOWN_KEYS.contains(&k.as_str()) && seen.insert(k.clone())).collect()
            },
            manifest_extra,
        })
}

fn arb_addition() -> impl Strategy<Value = AddSpec> {
    prop_oneof![
        (
            any::<bool>(),
            vec((arb_compression(), any::<u32>(), 0u64..1 << 30), 0..4),
            proptest::option::of(0u8..5),
            vec(arb_env_var(), 0..4),
        )
            .prop_map(|(docker, layers, skip, env)| AddSpec::Image { docker, layers, skip, env }),
        (arb_compression(), any::<u32>(), 0u64..1 << 30).prop_map(|(compression, seed, size)| AddSpec::Layer {
            compression,
            seed,
            size
        }),
    ]
}

fn base_layer_type(docker: bool, kind: u8) -> &'static str {
    match (docker, kind) {
        (true, 0) => mt::DOCKER_LAYER_TAR,
        (true, 1) => mt::DOCKER_LAYER_GZIP,
        (true, _) => mt::DOCKER_LAYER_FOREIGN,
        (false, 0) => mt::OCI_LAYER_TAR,
        (false, 1) => mt::OCI_LAYER_GZIP,
        (false, 2) => mt::OCI_LAYER_NONDIST_GZIP,
        (false, _) => mt::OCI_LAYER_ZSTD,
    }
}

/// Owned inputs of one composition.
struct Inputs {
    manifest: Vec<u8>,
    manifest_media_type: &'static str,
    config: Vec<u8>,
    additions: Vec<OwnedAddition>,
}

enum OwnedAddition {
    Image { label: String, manifest: Vec<u8>, media_type: &'static str, config: Vec<u8>, contributes: usize },
    Layer { label: String, layer: LayerInput },
}

impl Inputs {
    fn base(&self) -> BaseInput<'_> {
        BaseInput {
            base_ref: "registry.example/base:tag",
            manifest: &self.manifest,
            manifest_media_type: self.manifest_media_type,
            config: &self.config,
        }
    }

    fn additions(&self) -> Vec<Addition<'_>> {
        self.additions
            .iter()
            .map(|a| match a {
                OwnedAddition::Image { label, manifest, media_type, config, .. } => {
                    Addition::Image { label, manifest, manifest_media_type: media_type, config }
                }
                OwnedAddition::Layer { label, layer } => Addition::Layer { label, layer: layer.clone() },
            })
            .collect()
    }

    fn compose(&self) -> Composed {
        compose(&self.base(), &self.additions()).unwrap_or_else(|e| panic!("compose failed: {e}"))
    }

    fn added_layer_count(&self) -> usize {
        self.additions
            .iter()
            .map(|a| match a {
                OwnedAddition::Image { contributes, .. } => *contributes,
                OwnedAddition::Layer { .. } => 1,
            })
            .sum()
    }
}

fn manifest_bytes(
    media_type: Option<&str>,
    family: Family,
    config: &[u8],
    layers: Vec<Value>,
    extra: &[(String, Value)],
) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("schemaVersion".into(), json!(2));
    if let Some(media_type) = media_type {
        m.insert("mediaType".into(), json!(media_type));
    }
    m.insert(
        "config".into(),
        json!({"mediaType": mt::config_type(family), "digest": Digest::sha256_of(config).to_string(), "size": config.len()}),
    );
    m.insert("layers".into(), Value::Array(layers));
    for (k, v) in extra {
        m.insert(k.clone(), v.clone());
    }
    serde_json::to_vec(&Value::Object(m)).unwrap()
}

fn build(base: &BaseSpec, adds: &[AddSpec]) -> Inputs {
    let family = if base.docker { Family::Docker } else { Family::Oci };
    let mut cfg = Map::new();
    for (k, v) in &base.extra {
        cfg.insert(k.clone(), v.clone());
    }
    if base.created {
        cfg.insert("created".into(), json!("2020-02-02T02:02:02Z"));
    }
    cfg.insert("architecture".into(), json!("amd64"));
    cfg.insert("os".into(), json!("linux"));
    if let Some(env) = &base.env {
        cfg.insert("config".into(), json!({"Env": env, "Healthcheck": {"Test": ["NONE"]}}));
    }
    let diff_ids: Vec<String> =
        base.layers.iter().map(|l| digest(&format!("base-diff-{}", l.seed)).to_string()).collect();
    cfg.insert("rootfs".into(), json!({"type": "layers", "diff_ids": diff_ids}));
    if let Some(extra) = &base.history {
        let mut history: Vec<Value> = base.layers.iter().map(|_| json!({"created_by": "base step"})).collect();
        history.extend(extra.iter().map(|&empty| json!({"created_by": "extra", "empty_layer": empty})));
        cfg.insert("history".into(), Value::Array(history));
    }
    let config = serde_json::to_vec(&Value::Object(cfg)).unwrap();
    let layers = base
        .layers
        .iter()
        .map(|l| {
            let mut d = json!({
                "mediaType": base_layer_type(base.docker, l.kind),
                "digest": digest(&format!("base-{}", l.seed)).to_string(),
                "size": l.size,
            });
            if l.annotations {
                d["annotations"] = json!({"containerd.io/snapshot/stargz/toc.digest": digest("toc").to_string()});
            }
            if l.urls {
                d["urls"] = json!(["https://example.invalid/blob"]);
            }
            d
        })
        .collect();
    let manifest_media_type = mt::manifest_type(family);
    let manifest = manifest_bytes(
        base.media_type_in_doc.then_some(manifest_media_type),
        family,
        &config,
        layers,
        &base.manifest_extra,
    );

    let additions = adds
        .iter()
        .enumerate()
        .map(|(i, a)| match a {
            AddSpec::Image { docker, layers, skip, env } => {
                let family = if *docker { Family::Docker } else { Family::Oci };
                let mut run = json!({"Env": env});
                if let Some(skip) = skip {
                    run["Labels"] = json!({ SKIP_N_LABEL: skip.to_string() });
                }
                let diff_ids: Vec<String> =
                    layers.iter().map(|(_, seed, _)| digest(&format!("add-diff-{seed}")).to_string()).collect();
                let config = serde_json::to_vec(&json!({
                    "architecture": "amd64", "os": "linux", "config": run,
                    "rootfs": {"type": "layers", "diff_ids": diff_ids},
                }))
                .unwrap();
                let descriptors = layers
                    .iter()
                    .map(|(c, seed, size)| {
                        // A Docker image with a zstd layer can only carry the OCI type.
                        let media_type = mt::layer_type(family, *c).unwrap_or(mt::OCI_LAYER_ZSTD);
                        json!({"mediaType": media_type, "digest": digest(&format!("add-{seed}")).to_string(), "size": size})
                    })
                    .collect();
                let media_type = mt::manifest_type(family);
                OwnedAddition::Image {
                    label: format!("image {i}"),
                    manifest: manifest_bytes(Some(media_type), family, &config, descriptors, &[]),
                    media_type,
                    config,
                    contributes: layers.len().saturating_sub(skip.map_or(0, usize::from)),
                }
            }
            AddSpec::Layer { compression, seed, size } => {
                let d = digest(&format!("layer-{seed}"));
                let diff_id = if *compression == Compression::None { d.clone() } else { digest(&format!("layer-diff-{seed}")) };
                OwnedAddition::Layer {
                    label: format!("layer {i}"),
                    layer: LayerInput { digest: d, diff_id, size: *size, compression: *compression },
                }
            }
        })
        .collect();
    Inputs { manifest, manifest_media_type, config, additions }
}

fn layer_family(media_type: &str) -> Option<Family> {
    match media_type {
        mt::DOCKER_LAYER_TAR | mt::DOCKER_LAYER_GZIP | mt::DOCKER_LAYER_FOREIGN => Some(Family::Docker),
        mt::OCI_LAYER_TAR
        | mt::OCI_LAYER_GZIP
        | mt::OCI_LAYER_ZSTD
        | mt::OCI_LAYER_NONDIST_GZIP
        | mt::OCI_LAYER_NONDIST_TAR => Some(Family::Oci),
        _ => None,
    }
}

fn non_empty_history(config: &Value) -> usize {
    config["history"].as_array().map_or(0, |h| h.iter().filter(|e| e.get("empty_layer") != Some(&json!(true))).count())
}

proptest! {
    // Integration tests have no lib.rs next to them, so proptest could not persist failures
    // anyway; it would only warn on every run.
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn output_is_a_pure_function_of_the_input(base in arb_base(), adds in vec(arb_addition(), 0..5)) {
        let a = build(&base, &adds).compose();
        let b = build(&base, &adds).compose();
        prop_assert_eq!(&a.manifest, &b.manifest);
        prop_assert_eq!(&a.config, &b.config);
        prop_assert_eq!(&a.manifest_digest, &b.manifest_digest);
        prop_assert_eq!(&a.manifest_digest, &Digest::sha256_of(&a.manifest));
        prop_assert_eq!(&a.config_digest, &Digest::sha256_of(&a.config));
        prop_assert_eq!(&a.layers, &b.layers);
    }

    #[test]
    fn counts_of_layers_diff_ids_and_history_agree(base in arb_base(), adds in vec(arb_addition(), 0..5)) {
        let inputs = build(&base, &adds);
        let out = inputs.compose();
        let manifest = json(&out.manifest);
        let config = json(&out.config);
        let layers = manifest["layers"].as_array().unwrap().len();
        let added = inputs.added_layer_count();
        prop_assert_eq!(layers, base.layers.len() + added);
        prop_assert_eq!(out.layers.len(), layers);
        prop_assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), layers);
        let base_history = non_empty_history(&json(&inputs.config));
        match &base.history {
            Some(_) => prop_assert_eq!(non_empty_history(&config), base_history + added),
            None if base.layers.is_empty() => prop_assert_eq!(non_empty_history(&config), added),
            None => prop_assert!(config.get("history").is_none()),
        }
        // A consistent base stays consistent.
        let base_consistent = match &base.history {
            Some(_) => base_history == base.layers.len(),
            None => base.layers.is_empty(),
        };
        if base_consistent {
            prop_assert_eq!(non_empty_history(&config), layers);
        }
    }

    #[test]
    fn base_layers_come_out_verbatim_and_first(base in arb_base(), adds in vec(arb_addition(), 0..5)) {
        let inputs = build(&base, &adds);
        let out = inputs.compose();
        let manifest = json(&out.manifest);
        let base_layers = json(&inputs.manifest)["layers"].as_array().unwrap().clone();
        let layers = manifest["layers"].as_array().unwrap();
        let converted = out.manifest_media_type != inputs.manifest_media_type;
        prop_assert!(!converted || base.docker);
        for (i, (want, got)) in base_layers.iter().zip(layers).enumerate() {
            prop_assert_eq!(out.layers[i].origin, LayerOrigin::Base);
            if converted {
                let (mut want, mut got) = (want.clone(), got.clone());
                want.as_object_mut().unwrap().shift_remove("mediaType");
                let got_type = got.as_object_mut().unwrap().shift_remove("mediaType").unwrap();
                prop_assert_eq!(want, got);
                prop_assert_eq!(layer_family(got_type.as_str().unwrap()), Some(Family::Oci));
            } else {
                prop_assert_eq!(want, got);
            }
        }
        prop_assert!(out.layers[base_layers.len()..].iter().all(|l| l.origin != LayerOrigin::Base));
    }

    #[test]
    fn unknown_config_keys_survive_in_order(base in arb_base(), adds in vec(arb_addition(), 0..5)) {
        let inputs = build(&base, &adds);
        let out = json(&inputs.compose().config);
        let input = json(&inputs.config);
        for (k, v) in &base.extra {
            prop_assert_eq!(&out[k.as_str()], v);
        }
        let in_keys: Vec<&String> = input.as_object().unwrap().keys().collect();
        let out_keys: Vec<&String> = out.as_object().unwrap().keys().filter(|k| input.get(k.as_str()).is_some()).collect();
        prop_assert_eq!(in_keys, out_keys);
        if let Some(run) = input.get("config") {
            prop_assert_eq!(&out["config"]["Healthcheck"], &run["Healthcheck"]);
        }
    }

    #[test]
    fn every_layer_media_type_belongs_to_the_manifest_family(base in arb_base(), adds in vec(arb_addition(), 0..5)) {
        let inputs = build(&base, &adds);
        let out = inputs.compose();
        let manifest = json(&out.manifest);
        let family = mt::family_of(out.manifest_media_type).unwrap();
        prop_assert_eq!(manifest["mediaType"].as_str(), Some(out.manifest_media_type));
        prop_assert_eq!(manifest["config"]["mediaType"].as_str(), Some(mt::config_type(family)));
        for (l, d) in out.layers.iter().zip(manifest["layers"].as_array().unwrap()) {
            prop_assert_eq!(layer_family(&l.media_type), Some(family), "{}", l.media_type);
            prop_assert_eq!(d["mediaType"].as_str(), Some(l.media_type.as_str()));
        }
        // Both families carry the workspace-image annotations, as the reference writes them.
        prop_assert!(manifest["annotations"][SIZE_ANNOTATION].is_string());
        prop_assert!(manifest["annotations"][REF_ANNOTATION].is_string());
    }

    #[test]
    fn never_panics_on_arbitrary_bytes(
        manifest in vec(any::<u8>(), 0..300),
        config in vec(any::<u8>(), 0..300),
        add_manifest in vec(any::<u8>(), 0..300),
        add_config in vec(any::<u8>(), 0..300),
        media_type in "[ -~]{0,40}",
    ) {
        let base = BaseInput { base_ref: "r", manifest: &manifest, manifest_media_type: &media_type, config: &config };
        let _ = compose(&base, &[]);
        let additions = [Addition::Image { label: "x", manifest: &add_manifest, manifest_media_type: &media_type, config: &add_config }];
        let _ = compose(&base, &additions);
    }

    #[test]
    fn never_panics_on_arbitrary_json_in_known_places(
        docker in any::<bool>(),
        rootfs in prop_oneof![arb_json(), Just(json!({"type": "layers", "diff_ids": []}))],
        run in prop_oneof![arb_json(), arb_json().prop_map(|v| json!({"Env": v})), Just(json!({"Env": ["A=1"]}))],
        history in arb_json(),
        created in arb_json(),
        layers in prop_oneof![arb_json(), Just(json!([]))],
        annotations in arb_json(),
        config_desc_extra in arb_json(),
        skip in prop_oneof![arb_json(), "[ -~]{0,6}".prop_map(Value::from)],
        adds in vec(arb_addition(), 0..3),
    ) {
        let family = if docker { Family::Docker } else { Family::Oci };
        let config = serde_json::to_vec(&json!({
            "created": created, "config": run, "rootfs": rootfs, "history": history,
        })).unwrap();
        let mut manifest = json(&manifest_bytes(Some(mt::manifest_type(family)), family, &config, vec![], &[]));
        manifest["layers"] = layers;
        manifest["annotations"] = annotations;
        manifest["config"]["extra"] = config_desc_extra;
        let manifest = serde_json::to_vec(&manifest).unwrap();
        let add_config = serde_json::to_vec(&json!({
            "rootfs": {"diff_ids": []}, "config": {"Labels": {SKIP_N_LABEL: skip}},
        })).unwrap();
        let add_manifest = manifest_bytes(Some(mt::OCI_MANIFEST), Family::Oci, &add_config, vec![], &[]);
        let base = BaseInput { base_ref: "r", manifest: &manifest, manifest_media_type: mt::manifest_type(family), config: &config };
        let _ = compose(&base, &[]);
        // The config edits run only after every addition parsed, so also try with one that
        // always does.
        let layer = LayerInput { digest: digest("l"), diff_id: digest("l"), size: 1, compression: Compression::None };
        let _ = compose(&base, &[Addition::Layer { label: "l", layer }]);
        let mut additions = build(&arb_base_default(), &adds).additions;
        additions.push(OwnedAddition::Image {
            label: "odd".into(), manifest: add_manifest, media_type: mt::OCI_MANIFEST, config: add_config, contributes: 0,
        });
        let inputs = Inputs { manifest, manifest_media_type: mt::manifest_type(family), config, additions };
        let _ = compose(&inputs.base(), &inputs.additions());
    }
}

fn arb_base_default() -> BaseSpec {
    BaseSpec {
        docker: false,
        media_type_in_doc: true,
        layers: vec![],
        history: None,
        created: false,
        env: None,
        extra: vec![],
        manifest_extra: vec![],
    }
}
