//! Messages stored in JetStream KV buckets, and the schema version each is written with. A
//! reader refuses a record from a newer schema instead of misreading it (`StoredRecord`).

use crate::WireMessage;

/// A message stored as a KV record.
pub trait Record: WireMessage {
    /// Bumped when the record's meaning changes in a way an older reader must not ignore.
    const SCHEMA_VERSION: u32;
}

impl Record for crate::v1::SandboxRecord {
    const SCHEMA_VERSION: u32 = 1;
}

impl Record for crate::v1::MeterWatermark {
    const SCHEMA_VERSION: u32 = 1;
}

/// Schema 2: the relay's lease moved to `slipway_leases`; a schema-1 reader would take a record
/// with no lease in it for an expired one and run the relay a second time.
impl Record for crate::v1::RelayRecord {
    const SCHEMA_VERSION: u32 = 2;
}

impl Record for crate::v1::DeployJobRecord {
    const SCHEMA_VERSION: u32 = 1;
}

impl Record for crate::v1::DeploymentRecord {
    const SCHEMA_VERSION: u32 = 1;
}

impl Record for crate::v1::DeploymentNameRecord {
    const SCHEMA_VERSION: u32 = 1;
}

impl Record for crate::v1::Lease {
    const SCHEMA_VERSION: u32 = 1;
}

impl Record for crate::v1::PreviewRecord {
    const SCHEMA_VERSION: u32 = 1;
}

impl Record for crate::v1::RunPreviewsRecord {
    const SCHEMA_VERSION: u32 = 1;
}

impl Record for crate::v1::ShareRecord {
    const SCHEMA_VERSION: u32 = 1;
}

impl Record for crate::v1::TicketRecord {
    const SCHEMA_VERSION: u32 = 1;
}

impl Record for crate::v1::FoldCheckpoint {
    const SCHEMA_VERSION: u32 = 1;
}

impl Record for crate::v1::FoldCompleted {
    const SCHEMA_VERSION: u32 = 1;
}

impl Record for crate::v1::UsageAggregate {
    const SCHEMA_VERSION: u32 = 1;
}

impl Record for crate::v1::DedupeIndex {
    const SCHEMA_VERSION: u32 = 1;
}

impl Record for crate::v1::DedupeKeys {
    const SCHEMA_VERSION: u32 = 1;
}
