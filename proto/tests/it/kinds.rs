use prost::Message;
use prost_types::FileDescriptorSet;
use slipway_proto::EventKind;
use slipway_proto::v1::Publisher;

fn run_event_oneof_fields() -> Vec<String> {
    let set =
        FileDescriptorSet::decode(slipway_proto::FILE_DESCRIPTOR_SET).expect("descriptor set");
    let msg = set
        .file
        .iter()
        .flat_map(|f| f.message_type.iter())
        .find(|m| m.name() == "RunEvent")
        .expect("RunEvent");
    let payload = msg
        .oneof_decl
        .iter()
        .position(|o| o.name() == "payload")
        .expect("payload oneof") as i32;
    msg.field
        .iter()
        .filter(|f| f.oneof_index == Some(payload))
        .map(|f| f.name().to_string())
        .collect()
}

#[test]
fn each_kind_is_one_payload_field_with_its_token() {
    let fields = run_event_oneof_fields();
    let tokens: Vec<String> = EventKind::ALL
        .iter()
        .map(|k| k.token().to_string())
        .collect();
    assert_eq!(fields, tokens, "kinds follow RunEvent.payload exactly");
    for &k in EventKind::ALL {
        assert_eq!(EventKind::from_token(k.token()), Some(k));
        assert!(
            k.token()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{k}"
        );
        assert_ne!(k.publisher(), Publisher::Unspecified);
    }
    assert_eq!(EventKind::from_token("sandbox.ready"), None);
}

#[test]
fn the_issue_names_every_required_kind_with_its_publisher() {
    use Publisher::*;
    let required = [
        ("accepted", Planner),
        ("queued", Planner),
        ("sandbox_ready", Planner),
        ("files_written", Planner),
        ("dev_server_up", Planner),
        ("preview_ready", Preview),
        ("files_changed", Preview),
        ("share_created", Preview),
        ("share_revoked", Preview),
        ("share_expired", Preview),
        ("patch_applied", Planner),
        ("feedback_not_applied", Planner),
        ("checkpointed", Planner),
        ("branch_created", Planner),
        ("branch_chosen", Planner),
        ("deploy_started", Deployer),
        ("deploy_progress", Deployer),
        ("deployed", Deployer),
        ("deploy_failed", Deployer),
        ("closed", Planner),
        ("failed", Planner),
    ];
    for (token, publisher) in required {
        let kind = EventKind::from_token(token).unwrap_or_else(|| panic!("kind {token} missing"));
        assert_eq!(kind.publisher(), publisher, "publisher of {token}");
    }
}

#[test]
fn meter_catalogue_matches_its_document() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/usage-events.md"
    ))
    .expect("docs/usage-events.md");
    let required = [
        "sandbox_vcpu_ms",
        "active_cpu_ms",
        "memory_mib_ms",
        "disk_gib_ms",
        "exec_count",
        "sandboxes_created",
        "llm_input_tokens",
        "llm_output_tokens",
        "build_ms",
        "deploys",
    ];
    for name in required {
        assert!(
            slipway_proto::meters::find(name).is_some(),
            "meter {name} in the catalogue"
        );
    }
    for m in slipway_proto::meters::CATALOGUE {
        let kind = match m.kind {
            slipway_proto::meters::Kind::Cumulative => "cumulative",
            slipway_proto::meters::Kind::Delta => "delta",
        };
        let row = format!(
            "| `{}` | `{}` | {} | {} |",
            m.name, m.unit, kind, m.producer
        );
        assert!(
            doc.contains(&row),
            "docs/usage-events.md lacks the row `{row}`"
        );
    }
}
