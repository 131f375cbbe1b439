use rand::Rng;
use slipway_common::subjects::{
    self, Family, Service, SubjectError, patterns_overlap, user_from_token, user_token,
};
use slipway_proto::EventKind;

#[test]
fn no_two_families_share_a_subject() {
    let families = subjects::families();
    assert!(families.len() >= 14, "{families:?}");
    for (i, (fa, a)) in families.iter().enumerate() {
        for (fb, b) in families.iter().skip(i + 1) {
            assert!(
                !patterns_overlap(a, b),
                "{fa:?} `{a}` overlaps {fb:?} `{b}`"
            );
        }
    }
    // Every concrete subject Slipway builds lands in exactly one family.
    let run = slipway_proto::run_id_for("r");
    let concrete = vec![
        subjects::PROMPTS.to_string(),
        subjects::run_commands(&run).unwrap(),
        subjects::run_event(&run, EventKind::PreviewReady).unwrap(),
        subjects::usage(Service::Executor, "exec_count", "a.b@c d").unwrap(),
        subjects::usage_rejected("executor").unwrap(),
        subjects::billed("a.b@c d").unwrap(),
        subjects::DEPLOY_JOBS.to_string(),
        subjects::dlq("USAGE").unwrap(),
        subjects::sandbox_files("sbx_1").unwrap(),
        Service::Executor.op("sandbox.create"),
        Service::Billing.op("usage.get"),
    ];
    for s in concrete {
        let hits: Vec<&Family> = families
            .iter()
            .filter(|(_, p)| patterns_overlap(p, &s))
            .map(|(f, _)| f)
            .collect();
        assert_eq!(hits.len(), 1, "`{s}` matches {hits:?}");
    }
}

#[test]
fn overlap_follows_nats_wildcards() {
    assert!(patterns_overlap("a.b", "a.b"));
    assert!(patterns_overlap("a.*", "a.b"));
    assert!(patterns_overlap("a.>", "a.b.c"));
    assert!(patterns_overlap("a.*.c", "a.b.>"));
    assert!(!patterns_overlap("a.>", "a"));
    assert!(!patterns_overlap("a.*", "a.b.c"));
    assert!(!patterns_overlap("a.b", "a.c"));
    assert!(!patterns_overlap(
        "slipway.runs.*.commands",
        "slipway.runs.*.events.*"
    ));
}

#[test]
fn hostile_user_ids_round_trip_as_one_safe_token() {
    for id in [
        "a.b@c d",
        ">",
        "*",
        "u1",
        "=",
        "=41",
        "ü.ñ",
        "a..b",
        " ",
        "\t",
        "x>y*z",
        "UPPER-lower_9",
    ] {
        let token = user_token(id).expect(id);
        assert!(
            subjects::token(&token).is_ok(),
            "{id:?} -> {token:?} is one subject token"
        );
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'='),
            "{token:?} is a valid KV key"
        );
        assert_eq!(user_from_token(&token).as_deref(), Ok(id));
    }
    assert_eq!(user_token("u1").unwrap(), "u1", "plain ids stay readable");
    assert_eq!(user_token(""), Err(SubjectError::Empty));
    assert_eq!(user_from_token(""), Err(SubjectError::Empty));
    for bad in ["=4", "=zz", "a.b", "=41", "=C3", "a b"] {
        assert!(user_from_token(bad).is_err(), "{bad:?} is not canonical");
    }
}

#[test]
fn random_user_ids_round_trip_and_never_collide() {
    let mut rng = rand::rng();
    let mut seen = std::collections::HashMap::new();
    for _ in 0..slipway_test_support::random_cases() * 8 {
        let len = rng.random_range(1..24);
        let id: String = (0..len)
            .map(|_| match rng.random_range(0..4) {
                0 => char::from(rng.random_range(b' '..=b'~')),
                1 => ['.', '*', '>', '@', ' ', '='][rng.random_range(0..6)],
                2 => char::from_u32(rng.random_range(0xa0..0x2fff)).unwrap_or('x'),
                _ => char::from(rng.random_range(b'a'..=b'z')),
            })
            .collect();
        let token = user_token(&id).unwrap();
        assert!(subjects::token(&token).is_ok(), "{id:?} -> {token:?}");
        assert_eq!(user_from_token(&token).unwrap(), id);
        if let Some(other) = seen.insert(token.clone(), id.clone()) {
            assert_eq!(other, id, "two ids share the token {token}");
        }
    }
}

#[test]
fn minted_ids_must_be_single_tokens() {
    for bad in ["", "a.b", "a*", ">", "a b"] {
        assert!(subjects::run_commands(bad).is_err(), "{bad:?}");
        assert!(subjects::sandbox_files(bad).is_err(), "{bad:?}");
    }
    assert_eq!(
        subjects::usage(Service::Planner, "llm_input_tokens", "a.b").unwrap(),
        "slipway.usage.planner.llm_input_tokens.a=2Eb"
    );
}

#[test]
fn the_architecture_page_names_every_stream_bucket_and_subject() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/architecture.md"
    ))
    .expect("docs/architecture.md");
    let topo = slipway_common::topology::Topology::new(
        &slipway_common::Settings::load(&Default::default())
            .unwrap()
            .setup,
    );
    for s in &topo.streams {
        assert!(
            doc.contains(&format!("| `{}` |", s.name)),
            "stream {} is documented",
            s.name
        );
        for subject in &s.subjects {
            assert!(
                doc.contains(&format!("`{subject}`")),
                "subjects {subject} of {} documented",
                s.name
            );
        }
    }
    for c in &topo.consumers {
        // Partition consumers are documented by their pattern.
        let name = if c.pinned.is_some() {
            format!("{}-<p>-of-<P>", c.owner.as_str())
        } else {
            c.durable.clone()
        };
        assert!(
            doc.contains(&format!("`{}` / `{}`", c.stream, name)),
            "consumer {}/{}",
            c.stream,
            c.durable
        );
    }
    for b in &topo.buckets {
        assert!(
            doc.contains(&format!("| `{}` |", b.bucket)),
            "bucket {} is documented",
            b.bucket
        );
    }
    for o in &topo.object_stores {
        assert!(
            doc.contains(&format!("| `{}` |", o.bucket)),
            "object store {} is documented",
            o.bucket
        );
    }
}

#[test]
fn usage_subjects_are_read_in_every_form_and_the_rest_refused() {
    use slipway_common::subjects::usage_parts;
    let parts = Some(("executor", "exec_count", "u"));
    assert_eq!(usage_parts("slipway.usage.executor.exec_count.u"), parts);
    assert_eq!(usage_parts("slipway.usage.3.executor.exec_count.u"), parts);
    assert_eq!(usage_parts("slipway.usage.executor.exec_count.u.3"), parts);
    for bad in [
        "slipway.usage.executor.exec_count",
        "slipway.usage.executor.exec_count.u.x",
        "slipway.usage.3.executor.exec_count.u.4",
        "other.usage.executor.exec_count.u",
        "slipway.billed.executor.exec_count.u",
    ] {
        assert_eq!(usage_parts(bad), None, "{bad}");
    }
}
