//! The JetStream topology: every stream, durable consumer and KV bucket, and which component uses
//! which. Setup creates it; services verify the part they use; NATS permissions are derived from
//! it. Changing a value here is a contract change for operators: `slipway setup --update`
//! applies the editable ones.

use std::time::Duration;

use crate::config::{SetupSettings, StorageKind};
use crate::subjects::{self, Service, streams};

const DAY: Duration = Duration::from_secs(24 * 3600);

/// How long billing remembers the usage-event ids it has counted (the `BILLING_DEDUPE` bucket's
/// age): the accepted lateness (`billing.lateness_days`) stays below it.
pub const BILLING_DEDUPE_DAYS: u32 = 36;

/// How long the `BILLING_DEDUPE` bucket keeps a value after its last write: past the window
/// (counted in stream time), so a fold that runs up to 24 days behind the stream still finds a
/// user's keys however long the user was idle.
pub const BILLING_DEDUPE_KEEP_DAYS: u32 = 60;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retention {
    /// Kept until `max_age`: many readers.
    Limits,
    /// Removed once acknowledged: one durable worker pool.
    WorkQueue,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamSpec {
    pub name: &'static str,
    pub subjects: Vec<String>,
    pub retention: Retention,
    /// Zero keeps messages forever.
    pub max_age: Duration,
    /// JetStream's `Nats-Msg-Id` dedupe window.
    pub duplicate_window: Duration,
    pub max_message_size: i32,
    pub description: &'static str,
    /// Split by a key into partitions, each with its own pinned consumer.
    pub partitioning: Option<Partitioning>,
    /// Reads by subject (`DIRECT.GET` with `next_by_subj`) served by any replica: what a
    /// partition's worker reads a key's messages with.
    pub allow_direct: bool,
    /// Atomic batch publishes (ADR-50, server 2.12): all of a batch is stored or none of it.
    pub allow_atomic: bool,
}

/// A stream split into `partitions` by one token of its subjects: the server's subject
/// transform adds `partition(P, key)` as a token of the stored subject, and one consumer per
/// partition, pinned to one client at a time, filters on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partitioning {
    pub partitions: u32,
    /// Where the partition token goes. Right after the subjects' literal prefix
    /// (`slipway.usage.<p>.…`), a partition's filter is a literal prefix: the server finds a
    /// partition's next message without matching every other subject of the stream (measured:
    /// half its time in a busy fold went to that matching with the token last). Last
    /// (`….<p>`), the stored subjects keep their published prefixes (a run's commands stay
    /// under `slipway.runs.<run>.`, apart from `RUN_EVENTS`' `slipway.runs.<run>.events.…`).
    pub leading: bool,
    /// The published subjects the transform applies to (one `*` per token).
    pub source: String,
    /// Which wildcard of `source` is the key (1-based, as in the server's mapping functions).
    pub key_wildcard: u8,
    /// Who consumes the partitions: consumers are named `<owner>-<p>-of-<P>`.
    pub owner: Service,
    /// How long the server keeps a partition pinned to a client that stopped pulling.
    pub priority_timeout: Duration,
    pub ack_wait: Duration,
    pub max_ack_pending: i64,
}

impl Partitioning {
    /// The stream's subject transform destination: the source's tokens with the partition's,
    /// first after the literal prefix (`leading`) or last.
    pub fn destination(&self) -> String {
        let wildcards = self.source.split('.').filter(|t| *t == "*").count();
        debug_assert!(usize::from(self.key_wildcard) <= wildcards);
        let partition = format!(
            "{{{{partition({},{})}}}}",
            self.partitions, self.key_wildcard
        );
        let mut dest: Vec<String> = Vec::new();
        let mut w = 0;
        for token in self.source.split('.') {
            if token == "*" {
                if self.leading && w == 0 {
                    dest.push(partition.clone());
                }
                w += 1;
                dest.push(format!("{{{{wildcard({w})}}}}"));
            } else {
                dest.push(token.to_string());
            }
        }
        if !self.leading {
            dest.push(partition);
        }
        dest.join(".")
    }

    /// The stored subjects of partition `p`.
    pub fn filter(&self, p: u32) -> String {
        if !self.leading {
            return format!("{}.{p}", self.source);
        }
        let tokens: Vec<&str> = self.source.split('.').collect();
        let lead = tokens.iter().take_while(|t| **t != "*").count();
        format!(
            "{}.{p}.{}",
            tokens[..lead].join("."),
            tokens[lead..].join(".")
        )
    }

    /// The durable consumer of partition `p`. The count is in the name so that a change of `P`
    /// creates a new set beside the old one while the old drains (a consumer's filter cannot
    /// change meaning under it).
    pub fn consumer_name(&self, p: u32) -> String {
        format!("{}-{p}-of-{}", self.owner.as_str(), self.partitions)
    }

    /// The priority group every partition consumer pins clients in.
    pub fn group(&self) -> String {
        self.owner.as_str().to_string()
    }
}

/// Reads `<owner>-<p>-of-<P>` back: the partition and the count.
pub fn parse_partition_consumer(owner: Service, name: &str) -> Option<(u32, u32)> {
    let rest = name.strip_prefix(owner.as_str())?.strip_prefix('-')?;
    let (p, count) = rest.split_once("-of-")?;
    let (p, count): (u32, u32) = (p.parse().ok()?, count.parse().ok()?);
    (p < count && name == format!("{}-{p}-of-{count}", owner.as_str())).then_some((p, count))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerSpec {
    pub stream: &'static str,
    pub durable: String,
    /// The service that pulls from it.
    pub owner: Service,
    pub filter_subject: String,
    pub ack_wait: Duration,
    pub max_deliver: i64,
    pub max_ack_pending: i64,
    pub description: String,
    /// For a partition consumer: its priority group, pinned to one client at a time, and the
    /// server's `priority_timeout`.
    pub pinned: Option<(String, Duration)>,
}

/// An Object Store bucket (values past the KV limit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectStoreSpec {
    pub bucket: &'static str,
    pub max_age: Duration,
    pub description: &'static str,
}

impl ObjectStoreSpec {
    /// The stream JetStream keeps the store in.
    pub fn stream_name(&self) -> String {
        format!("OBJ_{}", self.bucket)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketSpec {
    pub bucket: &'static str,
    pub history: i64,
    /// Zero keeps entries forever.
    pub max_age: Duration,
    pub description: &'static str,
}

impl BucketSpec {
    /// The stream JetStream keeps the bucket in.
    pub fn stream_name(&self) -> String {
        format!("KV_{}", self.bucket)
    }
}

/// KV bucket names.
pub mod buckets {
    pub const RUNS: &str = "slipway_runs";
    pub const LEASES: &str = "slipway_leases";
    pub const SANDBOXES: &str = "slipway_sandboxes";
    pub const METER: &str = "slipway_meter";
    pub const RELAYS: &str = "slipway_relays";
    pub const PREVIEWS: &str = "slipway_previews";
    pub const SHARES: &str = "slipway_shares";
    /// Single-use browser tickets; kept for minutes, long past any ticket's life.
    pub const TICKETS: &str = "slipway_tickets";
    pub const BILLING: &str = "slipway_billing";
    pub const BILLING_DEDUPE: &str = "slipway_billing_dedupe";
    pub const QUOTAS: &str = "slipway_quotas";
    pub const DEPLOYMENTS: &str = "slipway_deployments";
    /// An Object Store: values past the KV limit, referenced from records.
    pub const BLOBS: &str = "slipway_blobs";
}

/// The whole topology, with the storage and replication of this installation.
#[derive(Clone, Debug)]
pub struct Topology {
    pub streams: Vec<StreamSpec>,
    pub consumers: Vec<ConsumerSpec>,
    pub buckets: Vec<BucketSpec>,
    pub object_stores: Vec<ObjectStoreSpec>,
    pub storage: StorageKind,
    pub replicas: usize,
}

impl Topology {
    pub fn new(settings: &SetupSettings) -> Self {
        let stream_subjects = |name: &str| {
            subjects::stream_subjects()
                .into_iter()
                .find(|(n, _)| *n == name)
                .map(|(_, s)| s)
                .unwrap_or_default()
        };
        let stream = |name: &'static str, retention, max_age, description| StreamSpec {
            name,
            subjects: stream_subjects(name),
            retention,
            max_age,
            duplicate_window: Duration::from_secs(settings.duplicate_window_sec),
            max_message_size: settings.max_message_bytes,
            description,
            partitioning: None,
            allow_direct: false,
            allow_atomic: false,
        };
        let partitioned = |source: String, key_wildcard, partitions, owner, leading| Partitioning {
            partitions,
            leading,
            source,
            key_wildcard,
            owner,
            priority_timeout: Duration::from_millis(settings.priority_timeout_ms),
            ack_wait: Duration::from_secs(settings.partition_ack_wait_sec),
            max_ack_pending: if owner == Service::Billing {
                settings.usage_max_ack_pending
            } else {
                settings.partition_max_ack_pending
            },
        };
        let days = |d: u64| DAY * u32::try_from(d).unwrap_or(u32::MAX);
        let streams = vec![
            stream(
                streams::PROMPTS,
                Retention::WorkQueue,
                7 * DAY,
                "prompts to start runs",
            ),
            StreamSpec {
                partitioning: Some(partitioned(
                    format!("{}.runs.*.*", subjects::ROOT),
                    1,
                    settings.run_command_partitions,
                    Service::Planner,
                    false,
                )),
                allow_direct: true,
                ..stream(
                    streams::RUN_COMMANDS,
                    Retention::Limits,
                    30 * DAY,
                    "commands and steps of runs in progress, partitioned by run",
                )
            },
            stream(
                streams::RUN_EVENTS,
                Retention::Limits,
                days(settings.events_max_age_days),
                "facts about runs, for platforms and UIs",
            ),
            StreamSpec {
                // Billing rebuilds its aggregates from the raw stream and keeps dedupe for 35
                // days of accepted lateness; the stream outlives both.
                max_message_size: settings.usage_max_message_bytes,
                duplicate_window: Duration::from_secs(settings.usage_duplicate_window_sec),
                partitioning: Some(partitioned(
                    format!("{}.usage.*.*.*", subjects::ROOT),
                    3,
                    settings.usage_partitions,
                    Service::Billing,
                    true,
                )),
                ..stream(
                    streams::USAGE,
                    Retention::Limits,
                    days(settings.usage_max_age_days),
                    "usage events, partitioned by end-user",
                )
            },
            stream(
                streams::USAGE_REJECTED,
                Retention::Limits,
                90 * DAY,
                "usage events billing refused, with the reason",
            ),
            StreamSpec {
                // Billing reads a user's messages to resume an interrupted publish, and
                // publishes a batch's messages for all its users at once, atomically.
                allow_direct: true,
                allow_atomic: true,
                ..stream(
                    streams::BILLED,
                    Retention::Limits,
                    days(settings.usage_max_age_days),
                    "priced usage for platforms' invoicing",
                )
            },
            stream(
                streams::DEPLOY_JOBS,
                Retention::WorkQueue,
                7 * DAY,
                "the deployer's job queue",
            ),
            stream(
                streams::DLQ,
                Retention::Limits,
                30 * DAY,
                "messages that can never be valid, with the reason",
            ),
        ];
        let consumer = |stream, owner: Service, description: &str, ack_wait| ConsumerSpec {
            stream,
            durable: owner.as_str().to_string(),
            owner,
            filter_subject: stream_subjects(stream).join(","),
            ack_wait,
            max_deliver: settings.max_deliver,
            max_ack_pending: 1000,
            description: description.to_string(),
            pinned: None,
        };
        let mut consumers = vec![
            consumer(
                streams::PROMPTS,
                Service::Planner,
                "planner: prompts to runs",
                Duration::from_secs(60),
            ),
            consumer(
                streams::DEPLOY_JOBS,
                Service::Deployer,
                "deployer: deploy jobs",
                Duration::from_secs(settings.deploy_ack_wait_sec),
            ),
        ];
        for s in &streams {
            if let Some(part) = &s.partitioning {
                // Usage is never given up on: a valid event delivered many times (crashes,
                // handovers, fenced batches) is still money. Billing refuses the invalid itself.
                let max_deliver = if s.name == streams::USAGE {
                    -1
                } else {
                    settings.max_deliver
                };
                consumers.extend(partition_consumers(s.name, part, max_deliver));
            }
        }
        let bucket = |bucket, max_age, description| BucketSpec {
            bucket,
            history: 1,
            max_age,
            description,
        };
        let buckets = vec![
            bucket(
                buckets::RUNS,
                Duration::ZERO,
                "runs and their steps (planner)",
            ),
            bucket(
                buckets::LEASES,
                Duration::ZERO,
                "leases for work no stream delivers: the usage sampler, file-watch relays",
            ),
            bucket(
                buckets::SANDBOXES,
                Duration::ZERO,
                "every sandbox with its run and end-user (executor)",
            ),
            bucket(
                buckets::METER,
                Duration::ZERO,
                "usage watermarks and pending intervals (executor)",
            ),
            bucket(
                buckets::RELAYS,
                Duration::ZERO,
                "file-watch relays (executor)",
            ),
            bucket(buckets::PREVIEWS, Duration::ZERO, "previews (preview)"),
            bucket(buckets::SHARES, Duration::ZERO, "share links (preview)"),
            bucket(
                buckets::TICKETS,
                Duration::from_secs(15 * 60),
                "single-use browser tickets (preview)",
            ),
            bucket(
                buckets::BILLING,
                Duration::ZERO,
                "aggregates and checkpoints (billing)",
            ),
            bucket(
                buckets::BILLING_DEDUPE,
                DAY * BILLING_DEDUPE_KEEP_DAYS,
                "per end-user, the (source, id) keys of its usage first seen in the last 36 days (billing)",
            ),
            bucket(
                buckets::QUOTAS,
                Duration::ZERO,
                "per end-user quotas and reservations (billing)",
            ),
            bucket(
                buckets::DEPLOYMENTS,
                Duration::ZERO,
                "deployments and versions (deployer)",
            ),
        ];
        let object_stores = vec![ObjectStoreSpec {
            bucket: buckets::BLOBS,
            max_age: days(settings.blobs_max_age_days),
            description: "values past the KV limit (plans, model outputs), referenced from records",
        }];
        Self {
            streams,
            consumers,
            buckets,
            object_stores,
            storage: settings.storage,
            replicas: settings.replicas,
        }
    }

    pub fn stream(&self, name: &str) -> Option<&StreamSpec> {
        self.streams.iter().find(|s| s.name == name)
    }

    /// The part of the topology `service` depends on (what it verifies before it is ready).
    pub fn for_service(&self, service: Service) -> Topology {
        let role = Role::of(service);
        Topology {
            streams: self
                .streams
                .iter()
                .filter(|s| role.consumes.contains(&s.name) || role.publishes.contains(&s.name))
                .cloned()
                .collect(),
            consumers: self
                .consumers
                .iter()
                .filter(|c| role.consumes.contains(&c.stream) && c.owner == service)
                .cloned()
                .collect(),
            buckets: self
                .buckets
                .iter()
                .filter(|b| role.buckets.contains(&b.bucket))
                .cloned()
                .collect(),
            object_stores: self
                .object_stores
                .iter()
                .filter(|o| role.object_stores.contains(&o.bucket))
                .cloned()
                .collect(),
            storage: self.storage,
            replicas: self.replicas,
        }
    }
}

/// The `P` consumers of a partitioned stream.
pub fn partition_consumers(
    stream: &'static str,
    part: &Partitioning,
    max_deliver: i64,
) -> Vec<ConsumerSpec> {
    (0..part.partitions)
        .map(|p| ConsumerSpec {
            stream,
            durable: part.consumer_name(p),
            owner: part.owner,
            filter_subject: part.filter(p),
            ack_wait: part.ack_wait,
            max_deliver,
            max_ack_pending: part.max_ack_pending,
            description: format!(
                "{}: partition {p} of {}",
                part.owner.as_str(),
                part.partitions
            ),
            pinned: Some((part.group(), part.priority_timeout)),
        })
        .collect()
}

/// What one service does with the topology.
#[derive(Clone, Copy, Debug)]
pub struct Role {
    /// Streams it reads through a durable consumer.
    pub consumes: &'static [&'static str],
    /// Streams it publishes into (with acknowledgements).
    pub publishes: &'static [&'static str],
    pub buckets: &'static [&'static str],
    pub object_stores: &'static [&'static str],
}

impl Role {
    pub fn of(service: Service) -> Role {
        use buckets as b;
        match service {
            Service::Planner => Role {
                consumes: &[streams::PROMPTS, streams::RUN_COMMANDS],
                publishes: &[
                    streams::RUN_COMMANDS,
                    streams::RUN_EVENTS,
                    streams::USAGE,
                    streams::DLQ,
                ],
                buckets: &[b::RUNS],
                object_stores: &[b::BLOBS],
            },
            Service::Executor => Role {
                consumes: &[],
                publishes: &[streams::USAGE],
                buckets: &[b::SANDBOXES, b::METER, b::RELAYS, b::LEASES],
                object_stores: &[],
            },
            Service::Preview => Role {
                // A browser's ticket opens a run's events (read with ordered consumers).
                consumes: &[streams::RUN_EVENTS],
                publishes: &[streams::RUN_EVENTS],
                buckets: &[b::PREVIEWS, b::SHARES, b::TICKETS, b::LEASES],
                object_stores: &[],
            },
            Service::Billing => Role {
                consumes: &[streams::USAGE],
                publishes: &[streams::BILLED, streams::USAGE_REJECTED, streams::DLQ],
                buckets: &[b::BILLING, b::BILLING_DEDUPE, b::QUOTAS],
                object_stores: &[],
            },
            Service::Deployer => Role {
                consumes: &[streams::DEPLOY_JOBS],
                publishes: &[
                    streams::DEPLOY_JOBS,
                    streams::RUN_EVENTS,
                    streams::USAGE,
                    streams::DLQ,
                ],
                buckets: &[b::DEPLOYMENTS],
                object_stores: &[],
            },
        }
    }
}
