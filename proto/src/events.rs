//! Run event kinds, generated from the `publisher` option on each `RunEvent.payload` field, so
//! that a kind's payload, subject token and publisher are defined once, in the contract.

include!(concat!(env!("OUT_DIR"), "/event_kinds.rs"));

impl crate::v1::RunEvent {
    /// The kind of this event, if it carries a payload.
    pub fn kind(&self) -> Option<EventKind> {
        self.payload.as_ref().map(|p| p.kind())
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.token())
    }
}
