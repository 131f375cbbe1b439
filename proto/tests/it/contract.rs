use prost_types::descriptor_proto::ReservedRange;
use prost_types::enum_descriptor_proto::EnumReservedRange;
use prost_types::{DescriptorProto, FileDescriptorSet};
use slipway_proto::contract::{self, check, golden_form};

fn current() -> FileDescriptorSet {
    golden_form(&contract::decode_set(slipway_proto::FILE_DESCRIPTOR_SET).expect("set"))
}

fn message<'a>(set: &'a mut FileDescriptorSet, name: &str) -> &'a mut DescriptorProto {
    set.file
        .iter_mut()
        .flat_map(|f| f.message_type.iter_mut())
        .find(|m| m.name() == name)
        .unwrap_or_else(|| panic!("message {name}"))
}

#[test]
fn the_committed_golden_set_is_compatible_with_the_contract() {
    let golden = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/golden/slipway.v1.binpb"
    ))
    .expect("proto/golden/slipway.v1.binpb");
    let report = check(&contract::decode_set(&golden).expect("golden"), &current());
    assert!(report.breaking.is_empty(), "{:#?}", report.breaking);
}

#[test]
fn an_unchanged_contract_has_nothing_to_report() {
    let report = check(&current(), &current());
    assert_eq!(report, contract::Report::default());
}

#[test]
fn removing_a_field_is_breaking() {
    let golden = current();
    let mut changed = current();
    let m = message(&mut changed, "PromptSubmitted");
    m.field.retain(|f| f.name() != "request_id");
    let report = check(&golden, &changed);
    assert_eq!(report.breaking.len(), 1, "{:#?}", report.breaking);
    assert!(
        report.breaking[0].contains("slipway.v1.PromptSubmitted.request_id"),
        "{}",
        report.breaking[0]
    );
    assert!(
        report.breaking[0].contains("without reserving"),
        "{}",
        report.breaking[0]
    );
}

#[test]
fn removing_a_field_with_its_number_and_name_reserved_is_allowed() {
    let golden = current();
    let mut changed = current();
    let m = message(&mut changed, "PromptSubmitted");
    let number = m
        .field
        .iter()
        .find(|f| f.name() == "request_id")
        .expect("field")
        .number();
    m.field.retain(|f| f.name() != "request_id");
    m.reserved_range.push(ReservedRange {
        start: Some(number),
        end: Some(number + 1),
    });
    m.reserved_name.push("request_id".into());
    assert!(check(&golden, &changed).is_compatible());
    // Reusing the reserved number later is breaking again.
    let mut reused = changed.clone();
    let m = message(&mut reused, "PromptSubmitted");
    let mut f = m.field[0].clone();
    f.name = Some("something_else".into());
    f.json_name = Some("somethingElse".into());
    f.number = Some(number);
    m.field.push(f);
    assert!(!check(&changed, &reused).is_compatible());
}

#[test]
fn renaming_retyping_and_renumbering_are_breaking() {
    let golden = current();
    let mut renamed = current();
    message(&mut renamed, "UsageEvent").field[0].name = Some("event_id".into());
    assert!(!check(&golden, &renamed).is_compatible());

    let mut retyped = current();
    let f = message(&mut retyped, "UsageEvent")
        .field
        .iter_mut()
        .find(|f| f.name() == "quantity")
        .expect("quantity");
    f.set_type(prost_types::field_descriptor_proto::Type::Double);
    assert!(!check(&golden, &retyped).is_compatible());

    let mut removed = current();
    removed
        .file
        .iter_mut()
        .for_each(|f| f.message_type.retain(|m| m.name() != "ShareLink"));
    let report = check(&golden, &removed);
    assert!(
        report
            .breaking
            .iter()
            .any(|b| b == "message slipway.v1.ShareLink removed"),
        "{:#?}",
        report.breaking
    );
}

#[test]
fn enum_values_may_be_added_but_not_removed_unreserved() {
    let golden = current();
    let mut added = current();
    let e = added
        .file
        .iter_mut()
        .flat_map(|f| f.enum_type.iter_mut())
        .find(|e| e.name() == "ErrorCode")
        .expect("ErrorCode");
    e.value.push(prost_types::EnumValueDescriptorProto {
        name: Some("ERROR_CODE_GONE".into()),
        number: Some(99),
        options: None,
    });
    let report = check(&golden, &added);
    assert!(report.is_compatible());
    assert_eq!(
        report.additions,
        vec!["enum value slipway.v1.ErrorCode.ERROR_CODE_GONE (= 99) added"]
    );

    let mut removed = current();
    let e = removed
        .file
        .iter_mut()
        .flat_map(|f| f.enum_type.iter_mut())
        .find(|e| e.name() == "ErrorCode")
        .expect("ErrorCode");
    e.value.retain(|v| v.name() != "ERROR_CODE_TIMEOUT");
    assert!(!check(&golden, &removed).is_compatible());
    let e = removed
        .file
        .iter_mut()
        .flat_map(|f| f.enum_type.iter_mut())
        .find(|e| e.name() == "ErrorCode")
        .expect("ErrorCode");
    e.reserved_range.push(EnumReservedRange {
        start: Some(9),
        end: Some(9),
    });
    e.reserved_name.push("ERROR_CODE_TIMEOUT".into());
    assert!(check(&golden, &removed).is_compatible());
}
