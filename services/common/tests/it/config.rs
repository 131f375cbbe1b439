use std::collections::HashMap;

use slipway_common::config::{ConfigError, LogFormat, Settings, Sources};

fn load(file: Option<&str>, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = file.map(|body| {
        let p = dir.path().join("slipway.toml");
        std::fs::write(&p, body).unwrap();
        p
    });
    Settings::load(&Sources {
        file: path,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
        defaults: Vec::new(),
    })
}

const FILE: &str = r#"
[nats]
url = "nats://file:4222"
[platform]
base_url = "http://file.example/api/v1"
[telemetry]
log_format = "json"
"#;

#[test]
fn defaults_then_file_then_alias_then_slipway_variables() {
    let s = load(None, &[]).unwrap();
    assert_eq!(s.nats.url, "nats://127.0.0.1:4222");
    assert_eq!(s.platform.base_url, "http://127.0.0.1:7070/api/v1");

    let s = load(Some(FILE), &[]).unwrap();
    assert_eq!(s.nats.url, "nats://file:4222");
    assert_eq!(s.telemetry.log_format, LogFormat::Json);

    let s = load(
        Some(FILE),
        &[
            ("MIOSA_BASE_URL", "https://alias.example/api/v1"),
            ("NATS_URL", "nats://alias:4222"),
        ],
    )
    .unwrap();
    assert_eq!(
        s.platform.base_url, "https://alias.example/api/v1",
        "the alias overrides the file"
    );
    assert_eq!(s.nats.url, "nats://alias:4222");

    let s = load(
        Some(FILE),
        &[
            ("MIOSA_BASE_URL", "https://alias.example/api/v1"),
            (
                "SLIPWAY__PLATFORM__BASE_URL",
                "https://explicit.example/api/v1",
            ),
            ("SLIPWAY__NATS__URL", "nats://explicit:4222"),
            ("SLIPWAY__SETUP__REPLICAS", "3"),
        ],
    )
    .unwrap();
    assert_eq!(
        s.platform.base_url, "https://explicit.example/api/v1",
        "SLIPWAY__ beats the alias"
    );
    assert_eq!(
        s.nats.url, "nats://explicit:4222",
        "SLIPWAY__ beats the file"
    );
    assert_eq!(s.setup.replicas, 3);
}

#[test]
fn a_bad_value_fails_with_its_key_named() {
    let e = load(None, &[("SLIPWAY__HEALTH__LISTEN", "not-an-address")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("health.listen"), "{e}");
    let e = load(None, &[("SLIPWAY__SETUP__REPLICAS", "many")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("setup.replicas"), "{e}");
    let e = load(None, &[("SLIPWAY__SETUP__REPLICAS", "9")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("setup.replicas"), "{e}");
    let e = load(None, &[("MIOSA_BASE_URL", "ftp://x")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("platform.base_url"), "{e}");
    let e = load(Some("[nats]\nurll = \"x\"\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("urll"), "an unknown key is refused by name: {e}");
    let e = load(None, &[("MIOSA_API_KEY", "sk-not-miosa")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("platform.api_key"), "{e}");
    assert!(
        !e.contains("sk-not-miosa"),
        "the rejected key is not echoed: {e}"
    );
    let e = load(None, &[("SLIPWAY__TELEMETRY__LOG_FORMAT", "yaml")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("telemetry.log_format"), "{e}");
}

#[test]
fn secrets_come_from_files_and_are_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("miosa.key");
    std::fs::write(&key, "msk_live_supersecret\n").unwrap();
    let s = load(
        None,
        &[("SLIPWAY__PLATFORM__API_KEY_FILE", key.to_str().unwrap())],
    )
    .unwrap();
    assert_eq!(
        s.platform.api_key.as_ref().unwrap().expose(),
        "msk_live_supersecret"
    );
    let printed = s.to_masked_toml();
    assert!(!printed.contains("supersecret"), "{printed}");
    assert!(printed.contains("***"), "{printed}");
    assert!(!format!("{s:?}").contains("supersecret"));

    let s = load(None, &[("MIOSA_API_KEY", "msk_test_fromenv")]).unwrap();
    assert_eq!(
        s.platform.api_key.as_ref().unwrap().expose(),
        "msk_test_fromenv"
    );
    assert!(!s.to_masked_toml().contains("fromenv"));

    let e = load(
        None,
        &[("SLIPWAY__PLATFORM__API_KEY_FILE", "/nonexistent/key")],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("platform.api_key_file"), "{e}");
}

#[test]
fn the_edge_resolve_setting_covers_the_edge_domain_only() {
    let s = load(None, &[("SLIPWAY__EDGE__RESOLVE", "127.0.0.1:7071")]).unwrap();
    let addr = "127.0.0.1:7071".parse().unwrap();
    assert_eq!(
        s.edge.resolve_host("3000-abc-def.preview.localhost"),
        Some(addr)
    );
    assert_eq!(s.edge.resolve_host("localhost"), Some(addr));
    assert_eq!(s.edge.resolve_host("api.example.com"), None);
    assert_eq!(s.edge.resolve_host("evil-localhost"), None);
    assert_eq!(
        load(None, &[]).unwrap().edge.resolve_host("x.localhost"),
        None
    );
}
