//! NATS authorization generated from the subject map and the topology: one user per service with
//! the least permissions its job needs, a platform user (prompts, commands, queries, reading run
//! events and billed usage) and an admin user (setup, dead-letter tools). Each principal gets its
//! own inbox prefix, so replies need no wildcard over other principals' inboxes.

use std::collections::BTreeSet;

use serde_json::json;
use slipway_proto::EventKind;

use crate::subjects::{self, Service, streams};
use crate::topology::{Role, Topology};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Principal {
    Service(Service),
    /// The platform that embeds Slipway (and the CLI acting for it).
    Platform,
    /// Setup and operator tools.
    Admin,
}

impl Principal {
    pub fn all() -> Vec<Principal> {
        let mut all: Vec<Principal> = Service::ALL.into_iter().map(Principal::Service).collect();
        all.push(Principal::Platform);
        all.push(Principal::Admin);
        all
    }

    pub fn name(self) -> &'static str {
        match self {
            Principal::Service(s) => s.as_str(),
            Principal::Platform => "platform",
            Principal::Admin => "admin",
        }
    }

    /// The inbox prefix this principal's connection must use (`nats.inbox_prefix`).
    pub fn inbox_prefix(self) -> String {
        format!("_INBOX_{}", self.name())
    }
}

/// Subjects a principal may publish to and subscribe on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Permissions {
    pub publish: BTreeSet<String>,
    pub subscribe: BTreeSet<String>,
    /// Whether it may answer requests sent to it (services do).
    pub allow_responses: bool,
}

fn consume_stream(p: &mut Permissions, stream: &str) {
    for s in [
        format!("$JS.API.STREAM.INFO.{stream}"),
        format!("$JS.API.CONSUMER.INFO.{stream}.*"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.*"),
        format!("$JS.API.CONSUMER.CREATE.{stream}"),
        format!("$JS.API.CONSUMER.CREATE.{stream}.>"),
        format!("$JS.API.CONSUMER.DELETE.{stream}.*"),
        format!("$JS.ACK.{stream}.>"),
        format!("$JS.FC.{stream}.>"),
    ] {
        p.publish.insert(s);
    }
}

/// The partitions of a stream, for their owner: found by name, pulled, acknowledged and
/// released (unpinned). Setup creates the consumers; their owner cannot create or delete one.
fn consume_partitions(p: &mut Permissions, stream: &str) {
    for s in [
        format!("$JS.API.STREAM.INFO.{stream}"),
        format!("$JS.API.CONSUMER.INFO.{stream}.*"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.*"),
        format!("$JS.API.CONSUMER.NAMES.{stream}"),
        format!("$JS.API.CONSUMER.UNPIN.{stream}.*"),
        format!("$JS.ACK.{stream}.>"),
    ] {
        p.publish.insert(s);
    }
}

/// Reading a stream by subject (a key's messages after its cursor).
fn direct_get(p: &mut Permissions, stream: &str) {
    p.publish.insert(format!("$JS.API.DIRECT.GET.{stream}"));
    p.publish.insert(format!("$JS.API.DIRECT.GET.{stream}.>"));
}

fn use_object_store(p: &mut Permissions, bucket: &str) {
    let stream = format!("OBJ_{bucket}");
    consume_stream(p, &stream);
    direct_get(p, &stream);
    for s in [
        format!("$O.{bucket}.>"),
        format!("$JS.API.STREAM.MSG.GET.{stream}"),
        format!("$JS.API.STREAM.PURGE.{stream}"),
    ] {
        p.publish.insert(s);
    }
}

fn use_bucket(p: &mut Permissions, bucket: &str) {
    let stream = format!("KV_{bucket}");
    consume_stream(p, &stream);
    for s in [
        format!("$KV.{bucket}.>"),
        format!("$JS.API.STREAM.MSG.GET.{stream}"),
        format!("$JS.API.DIRECT.GET.{stream}"),
        format!("$JS.API.DIRECT.GET.{stream}.>"),
    ] {
        p.publish.insert(s);
    }
}

/// The subjects of `stream` that `service` may publish: only its own part where the subject
/// names the producer (usage, run events).
fn stream_publish_subjects(service: Service, stream: &str, topo: &Topology) -> Vec<String> {
    match stream {
        streams::USAGE => vec![format!("{}.usage.{}.>", subjects::ROOT, service.as_str())],
        // Commands come from the platform; the planner adds only its own steps.
        streams::RUN_COMMANDS => vec![format!("{}.runs.*.steps", subjects::ROOT)],
        streams::RUN_EVENTS => EventKind::ALL
            .iter()
            .filter(|k| Service::from_publisher(k.publisher()) == Some(service))
            .map(|k| format!("{}.runs.*.events.{}", subjects::ROOT, k.token()))
            .collect(),
        streams::DLQ => Role::of(service)
            .consumes
            .iter()
            .map(|s| format!("{}.dlq.{s}", subjects::ROOT))
            .collect(),
        other => topo
            .stream(other)
            .map(|s| s.subjects.clone())
            .unwrap_or_default(),
    }
}

/// The permissions of one principal.
pub fn permissions(principal: Principal, topo: &Topology) -> Permissions {
    let mut p = Permissions::default();
    p.subscribe
        .insert(format!("{}.>", principal.inbox_prefix()));
    p.publish.insert("$JS.API.INFO".into());
    match principal {
        Principal::Admin => {
            p.publish = BTreeSet::from([">".to_string()]);
            p.subscribe = BTreeSet::from([">".to_string()]);
            p.allow_responses = true;
        }
        Principal::Platform => {
            p.publish.insert(subjects::PROMPTS.into());
            p.publish
                .insert(format!("{}.runs.*.commands", subjects::ROOT));
            // The public queries, and nothing else of any service.
            for o in crate::operations::callable_by(principal) {
                p.publish.insert(o.subject());
            }
            p.publish
                .insert(format!("$JS.API.STREAM.INFO.{}", streams::PROMPTS));
            p.publish
                .insert(format!("$JS.API.STREAM.INFO.{}", streams::RUN_COMMANDS));
            consume_stream(&mut p, streams::RUN_EVENTS);
            consume_stream(&mut p, streams::BILLED);
            p.subscribe
                .insert(format!("{}.runs.*.events.>", subjects::ROOT));
            p.subscribe.insert(format!("{}.billed.*", subjects::ROOT));
        }
        Principal::Service(service) => {
            let role = Role::of(service);
            p.allow_responses = true;
            p.subscribe.insert(service.all_ops());
            // The NATS service API, for its own name only: no other service's pings, so
            // nothing can answer for it (partitions are balanced over the replicas that answer).
            let name = service.nats_service_name();
            p.subscribe.insert("$SRV.*".into());
            p.subscribe.insert(format!("$SRV.*.{name}"));
            p.subscribe.insert(format!("$SRV.*.{name}.*"));
            // Only the operations the table lets it call.
            for o in crate::operations::callable_by(principal) {
                p.publish.insert(o.subject());
            }
            for s in role.consumes {
                let spec = topo.stream(s);
                if spec
                    .and_then(|s| s.partitioning.as_ref())
                    .is_some_and(|part| part.owner == service)
                {
                    consume_partitions(&mut p, s);
                } else {
                    consume_stream(&mut p, s);
                }
                if spec.is_some_and(|s| s.allow_direct) {
                    direct_get(&mut p, s);
                }
            }
            // A stream it writes with expected sequences, it reads back by subject (billing:
            // `BILLED`, where an interrupted publish resumes).
            for s in role.publishes {
                if topo.stream(s).is_some_and(|s| s.allow_direct) {
                    direct_get(&mut p, s);
                }
            }
            // How many replicas of it are alive (partitions are balanced over them).
            p.publish
                .insert(format!("$SRV.PING.{}", service.nats_service_name()));
            for s in role.publishes {
                p.publish.insert(format!("$JS.API.STREAM.INFO.{s}"));
                p.publish.extend(stream_publish_subjects(service, s, topo));
            }
            for b in role.buckets {
                use_bucket(&mut p, b);
            }
            for o in role.object_stores {
                use_object_store(&mut p, o);
            }
            match service {
                Service::Executor => {
                    p.publish
                        .insert(format!("{}.sandboxes.*.files", subjects::ROOT));
                }
                Service::Preview => {
                    p.subscribe
                        .insert(format!("{}.sandboxes.*.files", subjects::ROOT));
                }
                _ => {}
            }
        }
    }
    p
}

/// How a user proves who it is.
#[derive(Clone, Debug)]
pub enum Credential {
    /// An nkey user: the public key (`U...`); the seed stays with the component.
    Nkey(String),
    Password {
        user: String,
        password: String,
    },
}

/// One user of the generated authorization.
#[derive(Clone, Debug)]
pub struct User {
    pub principal: Principal,
    pub credential: Credential,
}

/// The nats-server `authorization` block for `users` (nats-server's configuration format accepts
/// JSON values).
pub fn authorization_config(users: &[User], topo: &Topology) -> String {
    let users: Vec<serde_json::Value> = users
        .iter()
        .map(|u| {
            let p = permissions(u.principal, topo);
            let mut perms = json!({
                "publish": { "allow": p.publish },
                "subscribe": { "allow": p.subscribe },
            });
            if p.allow_responses {
                perms["allow_responses"] = json!(true);
            }
            match &u.credential {
                Credential::Nkey(key) => json!({ "nkey": key, "permissions": perms }),
                Credential::Password { user, password } => {
                    json!({ "user": user, "password": password, "permissions": perms })
                }
            }
        })
        .collect();
    let body = serde_json::to_string_pretty(&json!({ "users": users })).unwrap_or_default();
    format!("authorization: {body}\n")
}
