//! The contract check: within `v1` changes are additive. Compares a golden descriptor set (the
//! committed `proto/golden/slipway.v1.binpb`) with the one compiled now and lists every breaking
//! change: a message, field, enum value or option removed without being reserved, or changed in
//! name, number, type, label or oneof.

use std::collections::BTreeMap;

use prost::Message;
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorProto,
    FileDescriptorSet,
};

/// The package the check covers; imports such as `google.protobuf` are not ours to keep.
pub const PACKAGE: &str = "slipway.v1";

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Changes that break readers or writers of the golden contract.
    pub breaking: Vec<String>,
    /// New messages, fields, enums and values: allowed, and to be blessed into the golden set.
    pub additions: Vec<String>,
}

impl Report {
    pub fn is_compatible(&self) -> bool {
        self.breaking.is_empty()
    }
}

/// Decodes an encoded `FileDescriptorSet`.
pub fn decode_set(bytes: &[u8]) -> Result<FileDescriptorSet, prost::DecodeError> {
    FileDescriptorSet::decode(bytes)
}

/// The golden form of a set: only the package's files, without source info, sorted by name, so
/// the committed file changes only when the contract does.
pub fn golden_form(set: &FileDescriptorSet) -> FileDescriptorSet {
    let mut file: Vec<FileDescriptorProto> = set
        .file
        .iter()
        .filter(|f| f.package() == PACKAGE)
        .cloned()
        .map(|mut f| {
            f.source_code_info = None;
            f
        })
        .collect();
    file.sort_by(|a, b| a.name().cmp(b.name()));
    FileDescriptorSet { file }
}

/// Compares `current` against `golden`.
pub fn check(golden: &FileDescriptorSet, current: &FileDescriptorSet) -> Report {
    let mut report = Report::default();
    let (g_msgs, g_enums, g_exts) = index(golden);
    let (c_msgs, c_enums, c_exts) = index(current);

    for (name, g) in &g_msgs {
        match c_msgs.get(name) {
            None => report.breaking.push(format!("message {name} removed")),
            Some(c) => compare_message(name, g, c, &mut report),
        }
    }
    for name in c_msgs.keys().filter(|n| !g_msgs.contains_key(*n)) {
        report.additions.push(format!("message {name} added"));
    }
    for (name, g) in &g_enums {
        match c_enums.get(name) {
            None => report.breaking.push(format!("enum {name} removed")),
            Some(c) => compare_enum(name, g, c, &mut report),
        }
    }
    for name in c_enums.keys().filter(|n| !g_enums.contains_key(*n)) {
        report.additions.push(format!("enum {name} added"));
    }
    for (name, g) in &g_exts {
        match c_exts.get(name) {
            None => report.breaking.push(format!("option {name} removed")),
            Some(c) => {
                if let Some(diff) = field_difference(g, c) {
                    report.breaking.push(format!("option {name}: {diff}"));
                }
            }
        }
    }
    report
}

type Index<'a> = (
    BTreeMap<String, &'a DescriptorProto>,
    BTreeMap<String, &'a EnumDescriptorProto>,
    BTreeMap<String, &'a FieldDescriptorProto>,
);

fn index(set: &FileDescriptorSet) -> Index<'_> {
    let mut msgs = BTreeMap::new();
    let mut enums = BTreeMap::new();
    let mut exts = BTreeMap::new();
    for file in set.file.iter().filter(|f| f.package() == PACKAGE) {
        for m in &file.message_type {
            index_message(PACKAGE, m, &mut msgs, &mut enums);
        }
        for e in &file.enum_type {
            enums.insert(format!("{PACKAGE}.{}", e.name()), e);
        }
        for x in &file.extension {
            exts.insert(format!("{PACKAGE}.{}", x.name()), x);
        }
    }
    (msgs, enums, exts)
}

fn index_message<'a>(
    scope: &str,
    m: &'a DescriptorProto,
    msgs: &mut BTreeMap<String, &'a DescriptorProto>,
    enums: &mut BTreeMap<String, &'a EnumDescriptorProto>,
) {
    let name = format!("{scope}.{}", m.name());
    // Map entries are generated from their map field; the field comparison covers them.
    if m.options.as_ref().is_some_and(|o| o.map_entry()) {
        return;
    }
    for nested in &m.nested_type {
        index_message(&name, nested, msgs, enums);
    }
    for e in &m.enum_type {
        enums.insert(format!("{name}.{}", e.name()), e);
    }
    msgs.insert(name, m);
}

fn compare_message(name: &str, g: &DescriptorProto, c: &DescriptorProto, report: &mut Report) {
    let oneof_name = |m: &DescriptorProto, f: &FieldDescriptorProto| {
        f.oneof_index
            .filter(|_| !f.proto3_optional())
            .and_then(|i| m.oneof_decl.get(usize::try_from(i).ok()?))
            .map(|o| o.name().to_string())
    };
    for gf in &g.field {
        let path = format!("{name}.{} (= {})", gf.name(), gf.number());
        match c.field.iter().find(|cf| cf.number() == gf.number()) {
            Some(cf) => {
                if let Some(diff) = field_difference(gf, cf) {
                    report.breaking.push(format!("field {path}: {diff}"));
                }
                let (go, co) = (oneof_name(g, gf), oneof_name(c, cf));
                if go != co {
                    report
                        .breaking
                        .push(format!("field {path}: oneof changed from {go:?} to {co:?}"));
                }
            }
            None => {
                let number_reserved = c
                    .reserved_range
                    .iter()
                    .any(|r| r.start() <= gf.number() && gf.number() < r.end());
                let name_reserved = c.reserved_name.iter().any(|n| n == gf.name());
                if !(number_reserved && name_reserved) {
                    report.breaking.push(format!(
                        "field {path} removed without reserving its number and name"
                    ));
                }
            }
        }
    }
    for gr in &g.reserved_range {
        for number in gr.start()..gr.end().min(gr.start().saturating_add(1024)) {
            if let Some(cf) = c.field.iter().find(|f| f.number() == number) {
                report.breaking.push(format!(
                    "field {name}.{} reuses reserved number {number}",
                    cf.name()
                ));
            }
        }
    }
    for gn in &g.reserved_name {
        if c.field.iter().any(|f| f.name() == gn) {
            report
                .breaking
                .push(format!("field {name}.{gn} reuses a reserved name"));
        }
    }
    for cf in c
        .field
        .iter()
        .filter(|cf| g.field.iter().all(|gf| gf.number() != cf.number()))
    {
        report.additions.push(format!(
            "field {name}.{} (= {}) added",
            cf.name(),
            cf.number()
        ));
    }
}

/// What changed between two versions of one field, if anything that matters on the wire or in
/// JSON.
fn field_difference(g: &FieldDescriptorProto, c: &FieldDescriptorProto) -> Option<String> {
    if g.name() != c.name() {
        return Some(format!("renamed to `{}` (breaks JSON)", c.name()));
    }
    if g.r#type() != c.r#type() || g.type_name() != c.type_name() {
        return Some(format!(
            "type changed from {:?} {} to {:?} {}",
            g.r#type(),
            g.type_name(),
            c.r#type(),
            c.type_name()
        ));
    }
    if g.label() != c.label() {
        return Some(format!(
            "label changed from {:?} to {:?}",
            g.label(),
            c.label()
        ));
    }
    if g.proto3_optional() != c.proto3_optional() {
        return Some("presence (`optional`) changed".to_string());
    }
    if g.json_name() != c.json_name() {
        return Some(format!("JSON name changed to `{}`", c.json_name()));
    }
    if g.extendee() != c.extendee() {
        return Some("extendee changed".to_string());
    }
    None
}

fn compare_enum(name: &str, g: &EnumDescriptorProto, c: &EnumDescriptorProto, report: &mut Report) {
    for gv in &g.value {
        match c.value.iter().find(|cv| cv.number() == gv.number()) {
            Some(cv) if cv.name() != gv.name() => report.breaking.push(format!(
                "enum value {name}.{} (= {}) renamed to `{}`",
                gv.name(),
                gv.number(),
                cv.name()
            )),
            Some(_) => {}
            None => {
                // Enum reserved ranges are inclusive at both ends.
                let number_reserved = c
                    .reserved_range
                    .iter()
                    .any(|r| r.start() <= gv.number() && gv.number() <= r.end());
                let name_reserved = c.reserved_name.iter().any(|n| n == gv.name());
                if !(number_reserved && name_reserved) {
                    report.breaking.push(format!(
                        "enum value {name}.{} (= {}) removed without reserving its number and name",
                        gv.name(),
                        gv.number()
                    ));
                }
            }
        }
    }
    for cv in c
        .value
        .iter()
        .filter(|cv| g.value.iter().all(|gv| gv.number() != cv.number()))
    {
        report.additions.push(format!(
            "enum value {name}.{} (= {}) added",
            cv.name(),
            cv.number()
        ));
    }
}
