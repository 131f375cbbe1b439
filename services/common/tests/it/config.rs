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
    // The file's path is shown, the secret not at all.
    assert!(printed.contains("api_key_file"), "{printed}");
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

const SECTIONS: [&str; 12] = [
    "nats",
    "health",
    "telemetry",
    "setup",
    "service",
    "platform",
    "edge",
    "planner",
    "preview",
    "billing",
    "deployer",
    "cli",
];

#[test]
fn an_unknown_key_in_any_section_is_refused_by_name() {
    for section in SECTIONS {
        let file = format!("[{section}]\nno_such_key_in_{section} = 1\n");
        let e = load(Some(&file), &[]).unwrap_err().to_string();
        assert!(
            e.contains(&format!("no_such_key_in_{section}")),
            "[{section}]: {e}"
        );
    }
    // And an unknown section.
    let e = load(Some("[plannr]\nprovider = \"builtin\"\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("plannr"), "{e}");
}

#[test]
fn every_section_round_trips_through_print_config() {
    // Non-default values in every service's section, so the round trip carries them.
    let settings = load(
        None,
        &[
            ("SLIPWAY__PLANNER__MAX_RUNS_IN_FLIGHT", "3"),
            ("SLIPWAY__PREVIEW__TOKEN_TTL_SEC", "600"),
            ("SLIPWAY__BILLING__LATENESS_DAYS", "30"),
            ("SLIPWAY__DEPLOYER__VERIFY_TIMEOUT_MS", "5000"),
            ("SLIPWAY__CLI__PRINCIPAL", "admin"),
            ("SLIPWAY__SETUP__USAGE_DUPLICATE_WINDOW_SEC", "600"),
        ],
    )
    .unwrap();
    let printed = settings.to_masked_toml();
    for section in SECTIONS {
        assert!(
            printed.contains(&format!("[{section}]")),
            "no [{section}] in:\n{printed}"
        );
    }
    let again = load(Some(&printed), &[]).unwrap();
    assert_eq!(again.to_masked_toml(), printed);
    assert_eq!(again.planner.max_runs_in_flight, 3);
    assert_eq!(again.billing.lateness_days, 30);
    assert_eq!(
        again.cli.principal,
        slipway_common::config::CliPrincipal::Admin
    );
}

#[test]
fn stream_limits_are_settings() {
    let settings = load(
        None,
        &[
            ("SLIPWAY__SETUP__USAGE_DUPLICATE_WINDOW_SEC", "600"),
            ("SLIPWAY__SETUP__EVENTS_MAX_AGE_DAYS", "7"),
        ],
    )
    .unwrap();
    let topo = slipway_common::topology::Topology::new(&settings.setup);
    let usage = topo.stream("USAGE").unwrap();
    assert_eq!(usage.duplicate_window, std::time::Duration::from_secs(600));
    let events = topo.stream("RUN_EVENTS").unwrap();
    assert_eq!(events.max_age, std::time::Duration::from_secs(7 * 86_400));
    // Bounds are checked: a lateness longer than the stream keeps events is refused.
    let e = load(
        None,
        &[
            ("SLIPWAY__SETUP__USAGE_MAX_AGE_DAYS", "30"),
            ("SLIPWAY__BILLING__LATENESS_DAYS", "35"),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("billing.lateness_days"), "{e}");
    // Nor later than billing remembers counted ids (an event could be counted twice).
    let e = load(None, &[("SLIPWAY__BILLING__LATENESS_DAYS", "36")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("billing.lateness_days"), "{e}");
    // A duplicate window longer than its stream keeps messages, which JetStream refuses.
    let e = load(
        None,
        &[
            ("SLIPWAY__SETUP__EVENTS_MAX_AGE_DAYS", "1"),
            ("SLIPWAY__SETUP__DUPLICATE_WINDOW_SEC", "90000"),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("setup.duplicate_window_sec"), "{e}");
    for (key, value, name) in [
        (
            "SLIPWAY__SETUP__USAGE_MAX_ACK_PENDING",
            "0",
            "setup.usage_max_ack_pending",
        ),
        (
            "SLIPWAY__SETUP__USAGE_MAX_ACK_PENDING",
            "10001",
            "setup.usage_max_ack_pending",
        ),
        (
            "SLIPWAY__SETUP__PARTITION_MAX_ACK_PENDING",
            "0",
            "setup.partition_max_ack_pending",
        ),
    ] {
        let e = load(None, &[(key, value)]).unwrap_err().to_string();
        assert!(e.contains(name), "{key}={value}: {e}");
    }
}

#[test]
fn print_config_with_credentials_prints_no_secret_and_loads_again() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "msk_live_very_secret").unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "hunter2-secret").unwrap();
    let settings = load(
        None,
        &[
            ("SLIPWAY__PLATFORM__API_KEY_FILE", key.to_str().unwrap()),
            ("SLIPWAY__NATS__USER", "billing"),
            ("SLIPWAY__NATS__PASSWORD_FILE", pw.to_str().unwrap()),
        ],
    )
    .unwrap();
    let printed = settings.to_masked_toml();
    assert!(
        !printed.contains("very_secret") && !printed.contains("hunter2"),
        "{printed}"
    );
    let again = load(Some(&printed), &[]).unwrap();
    assert_eq!(
        again.platform.api_key.unwrap().expose(),
        "msk_live_very_secret"
    );
    assert_eq!(again.nats.password.unwrap().expose(), "hunter2-secret");
    // A key written into the file itself is refused: secrets come from files.
    let e = load(Some("[platform]\napi_key = \"msk_live_x\"\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("api_key"), "{e}");
}

#[test]
fn with_credentials_the_inbox_prefix_is_the_principals() {
    use slipway_common::Service;
    use slipway_common::auth::Principal;
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "secret").unwrap();
    let settings = load(
        None,
        &[
            ("SLIPWAY__NATS__USER", "billing"),
            ("SLIPWAY__NATS__PASSWORD_FILE", pw.to_str().unwrap()),
        ],
    )
    .unwrap();
    let nats = settings.nats_as(Principal::Service(Service::Billing));
    assert_eq!(nats.inbox_prefix.as_deref(), Some("_INBOX_billing"));
    // Without credentials there is no principal: NATS's default inbox.
    let open = load(None, &[]).unwrap();
    assert_eq!(open.nats_as(Principal::Platform).inbox_prefix, None);
}

#[test]
fn the_preview_section_takes_origins_as_a_list_or_a_string_and_checks_its_bounds() {
    let s = load(None, &[]).unwrap();
    assert_eq!(s.preview.token_ttl_sec, 900);
    assert_eq!(s.preview.max_share_ttl_sec, 7 * 86_400);
    assert_eq!(
        (s.preview.debounce_ms, s.preview.debounce_max_ms),
        (150, 1000)
    );
    assert_eq!(s.preview.listen.to_string(), "127.0.0.1:7080");
    assert!(s.preview.allowed_origins.is_empty());
    let s = load(
        None,
        &[(
            "SLIPWAY__PREVIEW__ALLOWED_ORIGINS",
            "https://a.example, http://b.example:8080",
        )],
    )
    .unwrap();
    assert_eq!(
        s.preview.allowed_origins,
        ["https://a.example", "http://b.example:8080"]
    );
    let s = load(
        Some("[preview]\nallowed_origins = [\"https://c.example\"]\n"),
        &[],
    )
    .unwrap();
    assert_eq!(s.preview.allowed_origins, ["https://c.example"]);
    for (key, value) in [
        ("SLIPWAY__PREVIEW__TOKEN_TTL_SEC", "86401"),
        ("SLIPWAY__PREVIEW__TOKEN_TTL_SEC", "59"),
        ("SLIPWAY__PREVIEW__MAX_SHARE_TTL_SEC", "2592001"),
        ("SLIPWAY__PREVIEW__SHARE_TTL_SEC", "604801"),
        ("SLIPWAY__PREVIEW__SHARE_TTL_SEC", "0"),
        ("SLIPWAY__PREVIEW__DEBOUNCE_MS", "9"),
        ("SLIPWAY__PREVIEW__DEBOUNCE_MAX_MS", "2001"),
        ("SLIPWAY__PREVIEW__DEBOUNCE_MAX_MS", "100"),
        ("SLIPWAY__PREVIEW__MAX_PATHS", "0"),
        ("SLIPWAY__PREVIEW__SWEEP_INTERVAL_MS", "99"),
        ("SLIPWAY__PREVIEW__TICKET_TTL_SEC", "0"),
        ("SLIPWAY__PREVIEW__TICKET_TTL_SEC", "601"),
        ("SLIPWAY__PREVIEW__PUBLIC_URL", "https://api.example/"),
        ("SLIPWAY__PREVIEW__PUBLIC_URL", "ftp://api.example"),
        ("SLIPWAY__PREVIEW__ALLOWED_ORIGINS", "*"),
        ("SLIPWAY__PREVIEW__ALLOWED_ORIGINS", "https://a.example/"),
        ("SLIPWAY__PREVIEW__ALLOWED_ORIGINS", "a.example"),
    ] {
        let e = load(None, &[(key, value)]).unwrap_err().to_string();
        let name = key.trim_start_matches("SLIPWAY__PREVIEW__").to_lowercase();
        assert!(e.contains(&format!("preview.{name}")), "{key}={value}: {e}");
    }
    // The edges that are allowed.
    for (key, value) in [
        ("SLIPWAY__PREVIEW__TOKEN_TTL_SEC", "86400"),
        ("SLIPWAY__PREVIEW__DEBOUNCE_MAX_MS", "2000"),
        ("SLIPWAY__PREVIEW__TICKET_TTL_SEC", "600"),
        ("SLIPWAY__PREVIEW__PUBLIC_URL", "https://api.example"),
    ] {
        load(None, &[(key, value)]).unwrap();
    }
}

#[test]
fn the_billing_section_checks_its_prices_currency_and_batch_bounds() {
    let s = load(None, &[]).unwrap();
    assert_eq!(s.billing.currency, "USD");
    assert!(s.billing.prices.is_empty(), "quantities only by default");
    assert_eq!(s.billing.batch_max_bytes, 524_288);
    assert_eq!(s.billing.batch_max_events, 1000);
    assert_eq!(s.setup.usage_max_ack_pending, 2000);
    let s = load(
        None,
        &[("SLIPWAY__BILLING__PRICES__LLM_INPUT_TOKENS", "0.000003")],
    )
    .unwrap();
    assert_eq!(s.billing.prices["llm_input_tokens"], "0.000003");
    let s = load(
        Some("[billing]\ncurrency = \"EUR\"\n[billing.prices]\ndeploys = \"2\"\n"),
        &[],
    )
    .unwrap();
    assert_eq!(
        (
            s.billing.currency.as_str(),
            s.billing.prices["deploys"].as_str()
        ),
        ("EUR", "2")
    );
    for (key, value, named) in [
        (
            "SLIPWAY__BILLING__PRICES__NOT_A_METER",
            "1",
            "billing.prices",
        ),
        ("SLIPWAY__BILLING__PRICES__DEPLOYS", "-1", "billing.prices"),
        (
            "SLIPWAY__BILLING__PRICES__DEPLOYS",
            "0.0000000001",
            "billing.prices",
        ),
        ("SLIPWAY__BILLING__PRICES__DEPLOYS", "1e3", "billing.prices"),
        (
            "SLIPWAY__BILLING__PRICES__DEPLOYS",
            "100001",
            "billing.prices",
        ),
        (
            "SLIPWAY__BILLING__PRICES__DEPLOYS",
            "100000.5",
            "billing.prices",
        ),
        (
            "SLIPWAY__BILLING__PRICES__DEPLOYS",
            "1000000",
            "billing.prices",
        ),
        ("SLIPWAY__BILLING__CURRENCY", "usd", "billing.currency"),
        ("SLIPWAY__BILLING__CURRENCY", "DOLLARS", "billing.currency"),
        (
            "SLIPWAY__BILLING__BATCH_MAX_BYTES",
            "1023",
            "billing.batch_max_bytes",
        ),
        (
            "SLIPWAY__BILLING__BATCH_MAX_BYTES",
            "524289",
            "billing.batch_max_bytes",
        ),
        (
            "SLIPWAY__BILLING__BATCH_MAX_EVENTS",
            "0",
            "billing.batch_max_events",
        ),
        (
            "SLIPWAY__BILLING__BATCH_MAX_EVENTS",
            "1001",
            "billing.batch_max_events",
        ),
    ] {
        let e = load(None, &[(key, value)]).unwrap_err().to_string();
        assert!(e.contains(named), "{key}={value}: {e}");
    }
    for price in ["100000", "100000.000", "0.000000001", "099999.9"] {
        load(None, &[("SLIPWAY__BILLING__PRICES__DEPLOYS", price)]).unwrap();
    }
}
