//! The subject map, as code. Three families that never overlap: service requests
//! `slipway.<service>.v1.<op>`, JetStream stream subjects, and dead letters `slipway.dlq.<stream>`
//! (plus the core-NATS file-change relay). Every subject is built here; nothing else formats one.

use std::fmt;

use slipway_proto::EventKind;

/// The first token of every Slipway subject.
pub const ROOT: &str = "slipway";

/// A Slipway service that answers requests on `slipway.<service>.v1.<op>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Service {
    Planner,
    Executor,
    Preview,
    Billing,
    Deployer,
}

impl Service {
    pub const ALL: [Service; 5] = [
        Service::Planner,
        Service::Executor,
        Service::Preview,
        Service::Billing,
        Service::Deployer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Service::Planner => "planner",
            Service::Executor => "executor",
            Service::Preview => "preview",
            Service::Billing => "billing",
            Service::Deployer => "deployer",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// The service of the contract's `Publisher` value.
    pub fn from_publisher(p: slipway_proto::v1::Publisher) -> Option<Self> {
        use slipway_proto::v1::Publisher as P;
        match p {
            P::Planner => Some(Service::Planner),
            P::Executor => Some(Service::Executor),
            P::Preview => Some(Service::Preview),
            P::Billing => Some(Service::Billing),
            P::Deployer => Some(Service::Deployer),
            P::Unspecified => None,
        }
    }

    /// `slipway.<service>.v1`, the prefix of its operations.
    pub fn prefix(self) -> String {
        format!("{ROOT}.{}.v1", self.as_str())
    }

    /// `slipway.<service>.v1.<op>`. `op` may hold dots (`sandbox.create`).
    pub fn op(self, op: &str) -> String {
        format!("{}.{op}", self.prefix())
    }

    /// Every operation of the service.
    pub fn all_ops(self) -> String {
        format!("{}.>", self.prefix())
    }

    /// The name the service registers with the NATS service API (`$SRV.INFO.<name>`).
    pub fn nats_service_name(self) -> String {
        format!("slipway-{}", self.as_str())
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Stream names.
pub mod streams {
    pub const PROMPTS: &str = "PROMPTS";
    pub const RUN_COMMANDS: &str = "RUN_COMMANDS";
    pub const RUN_EVENTS: &str = "RUN_EVENTS";
    pub const USAGE: &str = "USAGE";
    pub const USAGE_REJECTED: &str = "USAGE_REJECTED";
    pub const BILLED: &str = "BILLED";
    pub const DEPLOY_JOBS: &str = "DEPLOY_JOBS";
    pub const DLQ: &str = "DLQ";
}

/// `slipway.prompts`: platform -> planner (work queue).
pub const PROMPTS: &str = "slipway.prompts";
/// `slipway.deploys.jobs`: the deployer's own durable queue.
pub const DEPLOY_JOBS: &str = "slipway.deploys.jobs";

/// `slipway.runs.<run>.commands`
pub fn run_commands(run_id: &str) -> Result<String, SubjectError> {
    Ok(format!("{ROOT}.runs.{}.commands", token(run_id)?))
}

/// `slipway.runs.<run>.steps`: the planner's own follow-ups of a run (outcomes of the steps it
/// started), in the run's partition beside its commands so they are applied in one order.
pub fn run_steps(run_id: &str) -> Result<String, SubjectError> {
    Ok(format!("{ROOT}.runs.{}.steps", token(run_id)?))
}

/// Every message of one run in `RUN_COMMANDS` as stored (commands and steps, whatever its
/// partition token): what the planner reads from a run's cursor.
pub fn run_inbox_stored(run_id: &str) -> Result<String, SubjectError> {
    Ok(format!("{ROOT}.runs.{}.*.*", token(run_id)?))
}

/// `slipway.runs.<run>.events.<kind>`
pub fn run_event(run_id: &str, kind: EventKind) -> Result<String, SubjectError> {
    Ok(format!(
        "{ROOT}.runs.{}.events.{}",
        token(run_id)?,
        kind.token()
    ))
}

/// `slipway.runs.<run>.events.>`: every event of one run.
pub fn run_events(run_id: &str) -> Result<String, SubjectError> {
    Ok(format!("{ROOT}.runs.{}.events.>", token(run_id)?))
}

/// `slipway.usage.<service>.<meter>.<user_token>`; `user_id` is encoded here.
pub fn usage(service: Service, meter: &str, user_id: &str) -> Result<String, SubjectError> {
    Ok(format!(
        "{ROOT}.usage.{}.{}.{}",
        service.as_str(),
        token(meter)?,
        user_token(user_id)?
    ))
}

/// The (service, meter, user token) of a `USAGE` subject in any of its forms: as published
/// (`slipway.usage.<service>.<meter>.<user>`), as stored (`slipway.usage.<p>.<service>.<meter>.
/// <user>`), or as earlier versions stored it (the partition token last). A partition token is
/// a number; a service name never is. `None` for anything else.
pub fn usage_parts(subject: &str) -> Option<(&str, &str, &str)> {
    let tokens: Vec<&str> = subject.split('.').collect();
    if tokens.len() < 5 || tokens[0] != ROOT || tokens[1] != "usage" {
        return None;
    }
    let numeric = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let rest = match tokens.len() {
        5 => &tokens[2..5],
        6 if numeric(tokens[2]) => &tokens[3..6],
        6 if numeric(tokens[5]) => &tokens[2..5],
        _ => return None,
    };
    Some((rest[0], rest[1], rest[2]))
}

/// `slipway.rejected.usage.<service>`: usage events billing refused, with the reason.
pub fn usage_rejected(service: &str) -> Result<String, SubjectError> {
    Ok(format!("{ROOT}.rejected.usage.{}", token(service)?))
}

/// `slipway.billed.<user_token>`
pub fn billed(user_id: &str) -> Result<String, SubjectError> {
    Ok(format!("{ROOT}.billed.{}", user_token(user_id)?))
}

/// `slipway.sandboxes.<sandbox>.files`: the executor's relay of a sandbox's file watch.
pub fn sandbox_files(sandbox_id: &str) -> Result<String, SubjectError> {
    Ok(format!("{ROOT}.sandboxes.{}.files", token(sandbox_id)?))
}

/// `slipway.dlq.<stream>`: messages of `stream` that can never be valid.
pub fn dlq(stream: &str) -> Result<String, SubjectError> {
    Ok(format!("{ROOT}.dlq.{}", token(stream)?))
}

/// What a subject pattern is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Family {
    /// Requests to a service's operations.
    Service(Service),
    /// Subjects captured by a JetStream stream.
    Stream(&'static str),
    /// Core NATS subjects outside any stream.
    Core(&'static str),
}

/// Every subject pattern Slipway uses, with its family. Patterns of different entries must never
/// match a common subject (a test proves it), so no message can land in two places.
pub fn families() -> Vec<(Family, String)> {
    let mut all: Vec<(Family, String)> = Service::ALL
        .into_iter()
        .map(|s| (Family::Service(s), s.all_ops()))
        .collect();
    for (stream, subjects) in stream_subjects() {
        for s in subjects {
            all.push((Family::Stream(stream), s));
        }
    }
    all.push((
        Family::Core("sandbox_files"),
        format!("{ROOT}.sandboxes.*.files"),
    ));
    all
}

/// The subjects each stream captures.
pub fn stream_subjects() -> Vec<(&'static str, Vec<String>)> {
    vec![
        (streams::PROMPTS, vec![PROMPTS.to_string()]),
        (
            streams::RUN_COMMANDS,
            vec![
                format!("{ROOT}.runs.*.commands"),
                format!("{ROOT}.runs.*.steps"),
            ],
        ),
        (streams::RUN_EVENTS, vec![format!("{ROOT}.runs.*.events.*")]),
        (streams::USAGE, vec![format!("{ROOT}.usage.*.*.*")]),
        (
            streams::USAGE_REJECTED,
            vec![format!("{ROOT}.rejected.usage.*")],
        ),
        (streams::BILLED, vec![format!("{ROOT}.billed.*")]),
        (streams::DEPLOY_JOBS, vec![DEPLOY_JOBS.to_string()]),
        (streams::DLQ, vec![format!("{ROOT}.dlq.*")]),
    ]
}

/// Whether some subject matches both patterns (NATS wildcards: `*` one token, `>` the rest).
pub fn patterns_overlap(a: &str, b: &str) -> bool {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.split('.').collect(), b.split('.').collect());
    let mut i = 0;
    loop {
        match (a.get(i), b.get(i)) {
            (None, None) => return true,
            (Some(&">"), Some(_)) | (Some(_), Some(&">")) => return true,
            (None, Some(_)) | (Some(_), None) => return false,
            (Some(x), Some(y)) => {
                if x != y && *x != "*" && *y != "*" {
                    return false;
                }
            }
        }
        i += 1;
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("an id used in a subject must not be empty")]
    Empty,
    #[error("`{0}` cannot be a subject token (no `.`, `*`, `>`, spaces or control characters)")]
    InvalidToken(String),
    #[error("`{0}` is not a valid encoded user token")]
    InvalidUserToken(String),
}

/// Checks that an id Slipway minted (run, sandbox, stream, meter) is a single subject token.
pub fn token(id: &str) -> Result<&str, SubjectError> {
    if id.is_empty() {
        return Err(SubjectError::Empty);
    }
    let bad = |c: char| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control();
    if id.chars().any(bad) {
        return Err(SubjectError::InvalidToken(id.to_string()));
    }
    Ok(id)
}

/// Encodes an end-user id (opaque: it may hold `.`, `@`, spaces, any UTF-8) as one subject token
/// that is also a valid KV key. Bytes of `[A-Za-z0-9_-]` stay as they are, so common ids stay
/// readable; every other byte becomes `=XX` (upper-case hex). The mapping is injective, so two
/// users never share a token.
pub fn user_token(user_id: &str) -> Result<String, SubjectError> {
    if user_id.is_empty() {
        return Err(SubjectError::Empty);
    }
    let mut out = String::with_capacity(user_id.len());
    for b in user_id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push('=');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    Ok(out)
}

/// The inverse of [`user_token`]. Refuses anything `user_token` would not have produced.
pub fn user_from_token(encoded: &str) -> Result<String, SubjectError> {
    let invalid = || SubjectError::InvalidUserToken(encoded.to_string());
    if encoded.is_empty() {
        return Err(SubjectError::Empty);
    }
    let mut bytes = Vec::with_capacity(encoded.len());
    let mut it = encoded.bytes();
    while let Some(b) = it.next() {
        if b == b'=' {
            let hi = it.next().and_then(hex_value).ok_or_else(invalid)?;
            let lo = it.next().and_then(hex_value).ok_or_else(invalid)?;
            bytes.push(hi << 4 | lo);
        } else if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            bytes.push(b);
        } else {
            return Err(invalid());
        }
    }
    let decoded = String::from_utf8(bytes).map_err(|_| invalid())?;
    // Only the canonical form is accepted (`=41` for `A` is not), so decoding is injective too.
    if user_token(&decoded)? != encoded {
        return Err(invalid());
    }
    Ok(decoded)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}
