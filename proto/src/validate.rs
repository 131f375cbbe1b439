//! Checks of platform-facing messages that the type system cannot express. A message that fails
//! them is refused with an error naming the field; nothing else is affected.

use crate::meters;
use crate::v1::{PromptSubmitted, RunCommand, UsageEvent, run_command};

/// Largest prompt accepted, in bytes.
pub const MAX_PROMPT_BYTES: usize = 64 * 1024;
/// Largest id (user, project, workspace, request), in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Largest feedback text accepted, in bytes.
pub const MAX_FEEDBACK_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    pub field: &'static str,
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ValidationError {
    ValidationError {
        field,
        reason: reason.into(),
    }
}

/// An opaque id: non-empty when required, bounded, without control characters.
pub fn check_id(field: &'static str, value: &str, required: bool) -> Result<(), ValidationError> {
    if value.is_empty() {
        return if required {
            Err(invalid(field, "is required"))
        } else {
            Ok(())
        };
    }
    if value.len() > MAX_ID_BYTES {
        return Err(invalid(
            field,
            format!("is longer than {MAX_ID_BYTES} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "contains control characters"));
    }
    Ok(())
}

/// Largest id of a sandbox-platform resource (sandbox, snapshot, process, preview, share,
/// deployment, version), in bytes.
pub const MAX_RESOURCE_ID_BYTES: usize = 128;

/// The id of a sandbox-platform resource, as it goes into a URL path: 1 to 128 of
/// `[A-Za-z0-9_.:-]`, and neither `.` nor `..`. So an id can never name another path (`/`,
/// `..`), add a query or fragment (`?`, `#`) or smuggle an escape (`%`).
pub fn check_resource_id(field: &'static str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(invalid(field, "is required"));
    }
    if value.len() > MAX_RESOURCE_ID_BYTES {
        return Err(invalid(
            field,
            format!("is longer than {MAX_RESOURCE_ID_BYTES} bytes"),
        ));
    }
    if value == "." || value == ".." {
        return Err(invalid(field, "is not an id"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
    {
        return Err(invalid(
            field,
            format!("may hold only letters, digits, `_`, `.`, `:` and `-` (not {c:?})"),
        ));
    }
    Ok(())
}

/// A branch or variant name: 1 to 40 of `[a-z0-9-]`, starting with a letter or digit.
pub fn check_branch_name(field: &'static str, name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("`{name}` is not 1 to 40 of [a-z0-9-]"),
        ))
    }
}

impl PromptSubmitted {
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.prompt.trim().is_empty() {
            return Err(invalid("prompt", "is required"));
        }
        if self.prompt.len() > MAX_PROMPT_BYTES {
            return Err(invalid(
                "prompt",
                format!("is longer than {MAX_PROMPT_BYTES} bytes"),
            ));
        }
        check_id("user_id", &self.user_id, true)?;
        check_id("request_id", &self.request_id, false)?;
        check_id("project_id", &self.project_id, false)?;
        check_id("workspace_id", &self.workspace_id, false)?;
        check_id("template_id", &self.template_id, false)?;
        if let Some(policy) = &self.autopilot {
            let mut seen = std::collections::BTreeSet::new();
            for v in &policy.fork_variants {
                check_branch_name("autopilot.fork_variants.name", &v.name)?;
                if v.name == "main" || !seen.insert(v.name.as_str()) {
                    return Err(invalid(
                        "autopilot.fork_variants.name",
                        format!("`{}` is reserved or repeated", v.name),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl RunCommand {
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_id("command_id", &self.command_id, true)?;
        if !crate::ids::is_run_id(&self.run_id) {
            return Err(invalid(
                "run_id",
                "is not a run id (`run_` and 24 hex digits)",
            ));
        }
        match &self.command {
            None => Err(invalid("command", "is required")),
            Some(run_command::Command::Feedback(f)) if f.text.trim().is_empty() => {
                Err(invalid("feedback.text", "is required"))
            }
            Some(run_command::Command::Feedback(f)) if f.text.len() > MAX_FEEDBACK_BYTES => {
                Err(invalid(
                    "feedback.text",
                    format!("is longer than {MAX_FEEDBACK_BYTES} bytes"),
                ))
            }
            Some(run_command::Command::Fork(f)) if f.variants.is_empty() => {
                Err(invalid("fork.variants", "needs at least one variant"))
            }
            Some(run_command::Command::Fork(f)) => f
                .variants
                .iter()
                .try_for_each(|v| check_branch_name("fork.variants.name", &v.name)),
            Some(run_command::Command::ChooseBranch(c)) => {
                check_branch_name("choose_branch.branch", &c.branch)
            }
            Some(run_command::Command::RevokeShare(r)) => {
                check_id("revoke_share.share_id", &r.share_id, true)
            }
            Some(_) => Ok(()),
        }
    }
}

impl UsageEvent {
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_id("id", &self.id, true)?;
        check_id("source", &self.source, true)?;
        check_id("subject", &self.subject, true)?;
        if self.r#type != meters::USAGE_EVENT_TYPE {
            return Err(invalid(
                "type",
                format!("must be `{}`", meters::USAGE_EVENT_TYPE),
            ));
        }
        if self.time.is_none() {
            return Err(invalid("time", "is required"));
        }
        let meter = meters::find(&self.meter)
            .ok_or_else(|| invalid("meter", format!("`{}` is not in the catalogue", self.meter)))?;
        // The meter is part of the fact an id names: `<run>:<step>:<n>:<meter>` ends in it,
        // `<sandbox>:<meter>:<from>-<to>` names it before the interval. Either way it is a whole
        // segment, so ids of two meters of the same step or interval never collide.
        if !self
            .id
            .split(':')
            .skip(1)
            .any(|segment| segment == meter.name)
        {
            return Err(invalid(
                "id",
                format!("must name its meter as a segment (`...:{}`)", meter.name),
            ));
        }
        if self.unit != meter.unit {
            return Err(invalid(
                "unit",
                format!("must be `{}` for {}", meter.unit, meter.name),
            ));
        }
        if !is_decimal(&self.quantity) {
            return Err(invalid(
                "quantity",
                "must be a non-negative decimal such as `12` or `0.5`",
            ));
        }
        Ok(())
    }
}

/// `digits[.digits]`, no sign, no exponent.
pub fn is_decimal(s: &str) -> bool {
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (s, None),
    };
    !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
}
