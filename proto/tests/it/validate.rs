use slipway_proto::v1::{PromptSubmitted, RunCommand, UsageEvent, run_command};
use slipway_proto::validate::{MAX_ID_BYTES, MAX_PROMPT_BYTES, is_decimal};

fn prompt(p: &str, u: &str) -> PromptSubmitted {
    PromptSubmitted {
        prompt: p.into(),
        user_id: u.into(),
        ..Default::default()
    }
}

#[test]
fn prompts_are_refused_with_the_field_named() {
    assert!(prompt("a todo app", "u1").validate().is_ok());
    assert_eq!(prompt("  ", "u1").validate().unwrap_err().field, "prompt");
    assert_eq!(prompt("x", "").validate().unwrap_err().field, "user_id");
    assert_eq!(
        prompt(&"x".repeat(MAX_PROMPT_BYTES + 1), "u")
            .validate()
            .unwrap_err()
            .field,
        "prompt"
    );
    assert_eq!(
        prompt("x", &"u".repeat(MAX_ID_BYTES + 1))
            .validate()
            .unwrap_err()
            .field,
        "user_id"
    );
    assert_eq!(
        prompt("x", "u\u{0}1").validate().unwrap_err().field,
        "user_id"
    );
    // Ids may hold dots, at signs and spaces: they are opaque.
    assert!(prompt("x", "a.b@c d").validate().is_ok());
    let mut p = prompt("x", "u");
    p.autopilot = Some(slipway_proto::v1::AutopilotPolicy {
        fork_variants: vec![
            slipway_proto::v1::ForkVariant {
                name: "dark".into(),
                instruction: "i".into(),
            },
            slipway_proto::v1::ForkVariant {
                name: "dark".into(),
                instruction: "j".into(),
            },
        ],
        ..Default::default()
    });
    assert_eq!(
        p.validate().unwrap_err().field,
        "autopilot.fork_variants.name"
    );
}

#[test]
fn commands_need_a_run_id_and_a_command() {
    let run_id = slipway_proto::run_id_for("r");
    let ok = RunCommand {
        command_id: "c1".into(),
        run_id: run_id.clone(),
        command: Some(run_command::Command::Feedback(run_command::Feedback {
            text: "bigger".into(),
            branch: String::new(),
        })),
        ..Default::default()
    };
    assert!(ok.validate().is_ok());
    let mut bad = ok.clone();
    bad.run_id = "run.x".into();
    assert_eq!(bad.validate().unwrap_err().field, "run_id");
    let mut bad = ok.clone();
    bad.command = None;
    assert_eq!(bad.validate().unwrap_err().field, "command");
    let mut bad = ok.clone();
    bad.command = Some(run_command::Command::Fork(run_command::Fork::default()));
    assert_eq!(bad.validate().unwrap_err().field, "fork.variants");
    let mut bad = ok;
    bad.command_id.clear();
    assert_eq!(bad.validate().unwrap_err().field, "command_id");
}

fn usage() -> UsageEvent {
    UsageEvent {
        id: "sbx_1:exec_count:3-5".into(),
        source: "slipway/executor".into(),
        r#type: "slipway.usage.v1".into(),
        subject: "u1".into(),
        time: Some(pbjson_types::Timestamp {
            seconds: 1,
            nanos: 0,
        }),
        spec_version: "1.0".into(),
        meter: "exec_count".into(),
        quantity: "2".into(),
        unit: "count".into(),
        ..Default::default()
    }
}

#[test]
fn usage_events_follow_the_catalogue() {
    assert!(usage().validate().is_ok());
    let mut step = usage();
    step.id = "run_1:plan:1:exec_count".into();
    assert!(step.validate().is_ok(), "a step id ending in its meter");
    type Mutation = Box<dyn Fn(&mut UsageEvent)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("id", Box::new(|e| e.id = "sbx_1:3-5".into())),
        ("id", Box::new(|e| e.id = "exec_count".into())),
        ("id", Box::new(|e| e.id = "sbx_1:exec_count_v2:3-5".into())),
        ("meter", Box::new(|e| e.meter = "cpu_seconds".into())),
        ("unit", Box::new(|e| e.unit = "ms".into())),
        ("quantity", Box::new(|e| e.quantity = "-1".into())),
        ("quantity", Box::new(|e| e.quantity = "1e3".into())),
        ("type", Box::new(|e| e.r#type = "other".into())),
        ("time", Box::new(|e| e.time = None)),
        ("subject", Box::new(|e| e.subject.clear())),
        ("source", Box::new(|e| e.source.clear())),
    ];
    for (field, mutate) in cases {
        let mut e = usage();
        mutate(&mut e);
        assert_eq!(e.validate().unwrap_err().field, field);
    }
}

#[test]
fn decimals() {
    for ok in ["0", "12", "0.5", "100.25"] {
        assert!(is_decimal(ok), "{ok}");
    }
    for bad in ["", ".5", "5.", "-1", "1e3", "1,5", " 1", "NaN"] {
        assert!(!is_decimal(bad), "{bad}");
    }
}

#[test]
fn a_resource_id_names_nothing_but_itself_in_a_url_path() {
    use slipway_proto::validate::{MAX_RESOURCE_ID_BYTES, check_resource_id};
    let longest = "a".repeat(MAX_RESOURCE_ID_BYTES);
    for ok in ["sbx_1", "a.b", "A-Z_0:9", "...", ".a", longest.as_str()] {
        assert!(check_resource_id("id", ok).is_ok(), "{ok:?} refused");
    }
    let too_long = "a".repeat(MAX_RESOURCE_ID_BYTES + 1);
    for bad in [
        "",
        ".",
        "..",
        "a/b",
        "../x",
        "a?b",
        "a#b",
        "a%2e",
        "a b",
        "é",
        "a\n",
        too_long.as_str(),
    ] {
        let e = check_resource_id("sandbox_id", bad).unwrap_err();
        assert!(e.to_string().contains("sandbox_id"), "{bad:?}: {e}");
    }
}

#[test]
fn an_id_is_bounded_and_free_of_control_characters() {
    use slipway_proto::validate::{MAX_ID_BYTES, check_id};
    let longest = "k".repeat(MAX_ID_BYTES);
    assert!(check_id("key", &longest, true).is_ok());
    assert!(
        check_id("key", "run:x:1 é", true).is_ok(),
        "any text but controls"
    );
    assert!(check_id("key", "", false).is_ok(), "optional and absent");
    for bad in ["", "a\u{0}b", "tab\there", &"k".repeat(MAX_ID_BYTES + 1)] {
        let e = check_id("key", bad, true).unwrap_err();
        assert!(e.to_string().contains("key"), "{bad:?}: {e}");
    }
}
