use prost::Message;
use slipway_proto::codec::{self, ContentType, DecodeError};
use slipway_proto::v1::{
    self, AutopilotPolicy, ForkVariant, PromptSubmitted, RunCommand, RunEvent, UsageEvent,
    run_command, run_event,
};
use slipway_proto::{EventKind, WireMessage};

fn round_trip<M: WireMessage + PartialEq + std::fmt::Debug>(m: &M) {
    for ct in [ContentType::Protobuf, ContentType::Json] {
        let bytes = codec::encode(m, ct);
        let back: M = codec::decode(Some(ct.as_str()), Some(&M::full_name()), &bytes)
            .unwrap_or_else(|e| panic!("{ct:?} decode of {}: {e}", M::full_name()));
        assert_eq!(&back, m, "{ct:?} round trip of {}", M::full_name());
    }
    // Proto JSON without any header is recognised by its leading brace.
    let json = codec::encode(m, ContentType::Json);
    let back: M = codec::decode(None, None, &json).expect("sniffed JSON");
    assert_eq!(&back, m);
}

fn ts(seconds: i64) -> Option<pbjson_types::Timestamp> {
    Some(pbjson_types::Timestamp { seconds, nanos: 0 })
}

fn prompt() -> PromptSubmitted {
    PromptSubmitted {
        prompt: "a todo app with dark mode".into(),
        user_id: "a.b@c d".into(),
        request_id: "req-42".into(),
        project_id: "p1".into(),
        workspace_id: "w1".into(),
        template_id: "node".into(),
        autopilot: Some(AutopilotPolicy {
            review_rounds: 2,
            fork_variants: vec![ForkVariant {
                name: "dark".into(),
                instruction: "make it dark".into(),
            }],
            share_ttl_sec: 3600,
            deploy: true,
            keep_sandbox: false,
        }),
        labels: [("team".to_string(), "growth".to_string())].into(),
    }
}

#[test]
fn prompt_round_trips_in_both_forms() {
    round_trip(&prompt());
}

#[test]
fn every_run_command_round_trips() {
    use run_command::Command as C;
    let commands = vec![
        C::Feedback(run_command::Feedback {
            text: "bigger title".into(),
            branch: "main".into(),
        }),
        C::Checkpoint(run_command::Checkpoint {
            comment: "v1".into(),
            branch: String::new(),
        }),
        C::Fork(run_command::Fork {
            variants: vec![ForkVariant {
                name: "b".into(),
                instruction: "blue".into(),
            }],
            from_branch: "main".into(),
            from_snapshot_id: "snap_1".into(),
        }),
        C::ChooseBranch(run_command::ChooseBranch { branch: "b".into() }),
        C::Share(run_command::Share {
            branch: "main".into(),
            ttl_sec: 600,
        }),
        C::RevokeShare(run_command::RevokeShare {
            share_id: "sh_1".into(),
        }),
        C::Deploy(run_command::Deploy {
            branch: "main".into(),
            name: "todo".into(),
            keep_sandbox: true,
        }),
        C::Rollback(run_command::Rollback { version: 1 }),
        C::Stop(run_command::Stop {
            reason: "done".into(),
        }),
    ];
    for c in commands {
        round_trip(&RunCommand {
            command_id: "cmd-1".into(),
            run_id: slipway_proto::run_id_for("req-1"),
            issued_at: ts(1_700_000_000),
            command: Some(c),
        });
    }
}

/// One payload of every kind, built from the kind list so a new kind cannot be forgotten here.
fn payload_of(kind: EventKind) -> run_event::Payload {
    use run_event::Payload as P;
    match kind {
        EventKind::Accepted => P::Accepted(v1::Accepted {
            prompt: "x".into(),
            ..Default::default()
        }),
        EventKind::Queued => P::Queued(v1::Queued { position: 3 }),
        EventKind::SandboxReady => P::SandboxReady(v1::SandboxReady {
            sandbox_id: "sbx".into(),
            template_id: "node".into(),
        }),
        EventKind::FilesWritten => P::FilesWritten(v1::FilesWritten {
            paths: vec!["a.js".into()],
            bytes: 10,
        }),
        EventKind::DevServerUp => P::DevServerUp(v1::DevServerUp {
            process_id: "1".into(),
            port: 3000,
        }),
        EventKind::PreviewReady => P::PreviewReady(v1::PreviewReady {
            url: "http://x".into(),
            token_expires_at: ts(5),
            ..Default::default()
        }),
        EventKind::FilesChanged => P::FilesChanged(v1::FilesChanged {
            paths: vec!["b".into()],
            resync: true,
            ..Default::default()
        }),
        EventKind::PatchApplied => P::PatchApplied(v1::PatchApplied {
            summary: "s".into(),
            ..Default::default()
        }),
        EventKind::FeedbackNotApplied => P::FeedbackNotApplied(v1::FeedbackNotApplied {
            reason: "r".into(),
            ..Default::default()
        }),
        EventKind::SelfChecked => P::SelfChecked(v1::SelfChecked {
            round: 1,
            passed: true,
            findings: vec![],
        }),
        EventKind::Checkpointed => P::Checkpointed(v1::Checkpointed {
            snapshot_id: "s".into(),
            comment: "c".into(),
        }),
        EventKind::BranchCreated => P::BranchCreated(v1::BranchCreated {
            sandbox_id: "s".into(),
            ..Default::default()
        }),
        EventKind::BranchChosen => P::BranchChosen(v1::BranchChosen {
            discarded: vec!["b".into()],
        }),
        EventKind::ShareCreated => P::ShareCreated(v1::ShareCreated {
            share_id: "sh".into(),
            url: "u".into(),
            expires_at: ts(9),
        }),
        EventKind::ShareRevoked => P::ShareRevoked(v1::ShareRevoked {
            share_id: "sh".into(),
        }),
        EventKind::ShareExpired => P::ShareExpired(v1::ShareExpired {
            share_id: "sh".into(),
        }),
        EventKind::DeployStarted => P::DeployStarted(v1::DeployStarted {
            job_id: "j".into(),
            deployment_name: "d".into(),
        }),
        EventKind::DeployProgress => P::DeployProgress(v1::DeployProgress {
            job_id: "j".into(),
            phase: "building".into(),
            message: "m".into(),
        }),
        EventKind::Deployed => P::Deployed(v1::Deployed {
            job_id: "j".into(),
            version: 2,
            digest: "abc".into(),
            ..Default::default()
        }),
        EventKind::DeployFailed => P::DeployFailed(v1::DeployFailed {
            code: v1::ErrorCode::Internal.into(),
            ..Default::default()
        }),
        EventKind::RolledBack => P::RolledBack(v1::RolledBack {
            version: 1,
            ..Default::default()
        }),
        EventKind::Promoted => P::Promoted(v1::Promoted {
            version: 2,
            ..Default::default()
        }),
        EventKind::TakenDown => P::TakenDown(v1::TakenDown {
            reason: "abuse".into(),
            ..Default::default()
        }),
        EventKind::Closed => P::Closed(v1::Closed {
            reason: "stop".into(),
            sandboxes_destroyed: vec!["s".into()],
        }),
        EventKind::Failed => P::Failed(v1::Failed {
            code: v1::ErrorCode::Unavailable.into(),
            message: "m".into(),
            step: "boot:1".into(),
        }),
    }
}

#[test]
fn every_run_event_kind_round_trips_and_reports_its_kind() {
    for &kind in EventKind::ALL {
        let event = RunEvent {
            event_id: format!("run_x:1:{kind}"),
            run_id: "run_x".into(),
            time: ts(1),
            attribution: Some(v1::Attribution {
                user_id: "u1".into(),
                ..Default::default()
            }),
            branch: "main".into(),
            payload: Some(payload_of(kind)),
        };
        assert_eq!(event.kind(), Some(kind));
        round_trip(&event);
    }
}

#[test]
fn usage_event_round_trips() {
    round_trip(&UsageEvent {
        id: "sbx_1:active_cpu_ms:100-250".into(),
        source: "slipway/executor".into(),
        r#type: "slipway.usage.v1".into(),
        subject: "a.b@c d".into(),
        time: ts(1_700_000_000),
        spec_version: "1.0".into(),
        meter: "active_cpu_ms".into(),
        quantity: "150".into(),
        unit: "ms".into(),
        run_id: "run_1".into(),
        sandbox_id: "sbx_1".into(),
        counter_from: 100,
        counter_to: 250,
        ..Default::default()
    });
}

#[test]
fn a_platform_can_publish_plain_json_without_headers() {
    let body = br#"{"prompt":"a todo app","user_id":"u1"}"#;
    let p: PromptSubmitted = codec::decode(None, None, body).expect("decodes");
    assert_eq!(p.prompt, "a todo app");
    assert_eq!(p.user_id, "u1");
    // The camelCase spelling of proto3 JSON is accepted too, and whitespace before the brace.
    let p: PromptSubmitted =
        codec::decode(None, None, b"  {\"prompt\":\"x\",\"userId\":\"u2\"}").expect("camel");
    assert_eq!(p.user_id, "u2");
}

#[test]
fn malformed_bodies_are_errors_not_panics() {
    let garbage = [0xff_u8, 0xff, 0xff, 0x01, 0x02];
    let e = codec::decode::<PromptSubmitted>(Some(codec::PROTOBUF), None, &garbage).unwrap_err();
    assert!(matches!(e, DecodeError::Protobuf { .. }), "{e}");
    let e = codec::decode::<PromptSubmitted>(None, None, b"{\"prompt\": 12").unwrap_err();
    assert!(matches!(e, DecodeError::Json { .. }), "{e}");
    let e = codec::decode::<PromptSubmitted>(Some("text/plain"), None, b"hi").unwrap_err();
    assert!(e.to_string().contains("text/plain"), "{e}");
    let body = prompt().encode_to_vec();
    let e = codec::decode::<PromptSubmitted>(
        Some(codec::PROTOBUF),
        Some("slipway.v1.RunCommand"),
        &body,
    )
    .unwrap_err();
    assert!(matches!(e, DecodeError::WrongMessageType { .. }), "{e}");
}

#[test]
fn newer_fields_and_enum_values_are_tolerated() {
    // A field this version does not know (added by a newer producer) is skipped, as in protobuf.
    let p: PromptSubmitted = codec::decode(
        None,
        None,
        br#"{"prompt":"x","user_id":"u","added_in_v1_9":"y"}"#,
    )
    .expect("tolerated");
    assert_eq!(p.prompt, "x");
    let e: v1::Error = codec::decode(
        None,
        None,
        br#"{"code":"ERROR_CODE_FROM_THE_FUTURE","message":"m"}"#,
    )
    .expect("unknown enum value tolerated");
    assert_eq!(e.code, 0);
    assert_eq!(e.message, "m");
}

#[test]
fn run_ids_are_stable_distinct_and_subject_safe() {
    let a = slipway_proto::run_id_for("req-1");
    assert_eq!(
        a,
        slipway_proto::run_id_for("req-1"),
        "same request id, same run"
    );
    assert_ne!(a, slipway_proto::run_id_for("req-2"));
    assert_ne!(a, slipway_proto::run_id_for("req-1 "));
    assert!(slipway_proto::ids::is_run_id(&a), "{a}");
    assert!(a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    let derived = slipway_proto::request_id_for_sequence(17);
    assert!(derived.contains("17"));
    assert_ne!(
        slipway_proto::run_id_for(&derived),
        slipway_proto::run_id_for(&slipway_proto::request_id_for_sequence(18))
    );
    // Many distinct request ids give distinct run ids.
    let n = 10_000;
    let ids: std::collections::HashSet<String> = (0..n)
        .map(|i| slipway_proto::run_id_for(&format!("r{i}")))
        .collect();
    assert_eq!(ids.len(), n);
}
