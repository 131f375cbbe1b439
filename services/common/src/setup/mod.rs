//! Setup: creates the topology idempotently, and verifies it. A second run creates nothing; a
//! resource whose configuration drifted is reported (and with `Mode::Update`, corrected where
//! JetStream allows it), never silently replaced.

mod partitions;

use std::fmt;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, object_store, stream};

use crate::config::StorageKind;
use crate::topology::{BucketSpec, ConsumerSpec, ObjectStoreSpec, Retention, StreamSpec, Topology};

pub use partitions::{DrainWait, partition_state};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Create what is missing; report drift.
    CreateMissing,
    /// Also update drifted streams and consumers where JetStream allows the change.
    Update,
}

/// One configuration value that differs from the topology.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drift {
    /// For example `stream USAGE` or `consumer PROMPTS/planner`.
    pub resource: String,
    pub field: &'static str,
    pub expected: String,
    pub actual: String,
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} is {}, expected {}",
            self.resource, self.field, self.actual, self.expected
        )
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub created: Vec<String>,
    pub unchanged: Vec<String>,
    pub updated: Vec<String>,
    /// Partition consumers of an earlier partition count, removed once drained.
    pub deleted: Vec<String>,
    pub drifted: Vec<Drift>,
}

#[derive(Debug, thiserror::Error)]
#[error("{resource}: {message}")]
pub struct SetupError {
    pub resource: String,
    pub message: String,
}

fn err(resource: &str, e: impl fmt::Display) -> SetupError {
    SetupError {
        resource: resource.to_string(),
        message: e.to_string(),
    }
}

/// Creates every missing stream, bucket and consumer of `topo`; reports the rest.
pub async fn apply(
    js: &jetstream::Context,
    topo: &Topology,
    mode: Mode,
) -> Result<Report, SetupError> {
    apply_with(js, topo, mode, DrainWait::default()).await
}

/// As `apply`, with a bound on how long `Mode::Update` waits for the old partition consumers of a
/// changed partition count to drain (past it, the change stays half-done, reported as drift, and
/// the next run carries on).
pub async fn apply_with(
    js: &jetstream::Context,
    topo: &Topology,
    mode: Mode,
    drain: DrainWait,
) -> Result<Report, SetupError> {
    let mut report = Report::default();
    for spec in &topo.streams {
        let resource = format!("stream {}", spec.name);
        let expected = stream_config(spec, topo);
        match stream_info(js, spec.name).await? {
            None => {
                js.create_stream(expected)
                    .await
                    .map_err(|e| err(&resource, e))?;
                crate::failpoint::hit("setup.after_stream");
                report.created.push(resource);
            }
            Some(actual) => {
                let drift = diff_stream(&resource, &expected, &actual);
                let repartition = spec.partitioning.is_some()
                    && actual.subject_transform != expected.subject_transform;
                if repartition && mode == Mode::Update {
                    // Marks where the new partitioning starts, for the new consumers.
                    partitions::update_transform(js, spec, expected).await?;
                    report.updated.push(resource);
                } else {
                    // What the server and a partition change keep in the metadata stays.
                    let expected = stream::Config {
                        metadata: actual.metadata.clone(),
                        ..expected
                    };
                    settle(&mut report, resource, drift, mode, || async {
                        js.update_stream(expected.clone()).await.map(|_| ())
                    })
                    .await?;
                }
            }
        }
    }
    for spec in &topo.object_stores {
        let resource = format!("object store {}", spec.bucket);
        match stream_info(js, &spec.stream_name()).await? {
            None => {
                js.create_object_store(object_store_config(spec, topo))
                    .await
                    .map_err(|e| err(&resource, e))?;
                report.created.push(resource);
            }
            Some(actual) => {
                let drift = diff_store(&resource, spec.max_age, topo, &actual);
                settle(&mut report, resource, drift, mode, || async {
                    let mut config = actual.clone();
                    config.max_age = spec.max_age;
                    js.update_stream(config).await.map(|_| ())
                })
                .await?;
            }
        }
    }
    for spec in &topo.buckets {
        let resource = format!("bucket {}", spec.bucket);
        match stream_info(js, &spec.stream_name()).await? {
            None => {
                js.create_key_value(bucket_config(spec, topo))
                    .await
                    .map_err(|e| err(&resource, e))?;
                crate::failpoint::hit("setup.after_bucket");
                report.created.push(resource);
            }
            Some(actual) => {
                let drift = diff_bucket(&resource, spec, topo, &actual);
                settle(&mut report, resource, drift, mode, || async {
                    js.create_or_update_key_value(bucket_config(spec, topo))
                        .await
                        .map(|_| ())
                })
                .await?;
            }
        }
    }
    // A partitioned stream whose consumers are of another partition count (or the single
    // durable of before) is moved over in the safe order, not created beside it.
    let mut moving = Vec::new();
    for stream in &topo.streams {
        if let Some(part) = &stream.partitioning {
            let state = partitions::partition_state(js, stream.name, part).await?;
            if !state.stale.is_empty() {
                moving.push(stream.name);
                partitions::repartition(js, topo, stream, part, &state, mode, drain, &mut report)
                    .await?;
            }
        }
    }
    for spec in &topo.consumers {
        if moving.contains(&spec.stream) {
            continue;
        }
        let resource = format!("consumer {}/{}", spec.stream, spec.durable);
        let expected = consumer_config(spec);
        match consumer_info(js, spec).await? {
            None => {
                let s = js
                    .get_stream_no_info(spec.stream)
                    .await
                    .map_err(|e| err(&resource, e))?;
                s.create_consumer(expected)
                    .await
                    .map_err(|e| err(&resource, e))?;
                report.created.push(resource);
            }
            Some(actual) => {
                let drift = diff_consumer(&resource, spec, &actual);
                settle(&mut report, resource, drift, mode, || async {
                    let s = js.get_stream_no_info(spec.stream).await?;
                    s.update_consumer(expected.clone()).await.map(|_| ())?;
                    Ok::<_, async_nats::Error>(())
                })
                .await?;
            }
        }
    }
    Ok(report)
}

async fn settle<F, Fut, E>(
    report: &mut Report,
    resource: String,
    drift: Vec<Drift>,
    mode: Mode,
    update: F,
) -> Result<(), SetupError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: fmt::Display,
{
    if drift.is_empty() {
        report.unchanged.push(resource);
    } else if mode == Mode::Update {
        update().await.map_err(|e| {
            err(
                &resource,
                format!(
                    "cannot update ({e}); drift: {}",
                    drift
                        .iter()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            )
        })?;
        report.updated.push(resource);
    } else {
        report.drifted.extend(drift);
    }
    Ok(())
}

/// Every difference between `topo` and the server: a missing resource is one drift too.
pub async fn verify(js: &jetstream::Context, topo: &Topology) -> Result<Vec<Drift>, SetupError> {
    let missing = |resource: String| Drift {
        resource,
        field: "existence",
        expected: "present".into(),
        actual: "missing (run `slipway setup`)".into(),
    };
    let mut drifts = Vec::new();
    for spec in &topo.streams {
        let resource = format!("stream {}", spec.name);
        match stream_info(js, spec.name).await? {
            None => drifts.push(missing(resource)),
            Some(actual) => {
                drifts.extend(diff_stream(&resource, &stream_config(spec, topo), &actual))
            }
        }
    }
    for spec in &topo.buckets {
        let resource = format!("bucket {}", spec.bucket);
        match stream_info(js, &spec.stream_name()).await? {
            None => drifts.push(missing(resource)),
            Some(actual) => drifts.extend(diff_bucket(&resource, spec, topo, &actual)),
        }
    }
    for spec in &topo.object_stores {
        let resource = format!("object store {}", spec.bucket);
        match stream_info(js, &spec.stream_name()).await? {
            None => drifts.push(missing(resource)),
            Some(actual) => drifts.extend(diff_store(&resource, spec.max_age, topo, &actual)),
        }
    }
    for spec in &topo.consumers {
        let resource = format!("consumer {}/{}", spec.stream, spec.durable);
        match consumer_info(js, spec).await? {
            None => drifts.push(missing(resource)),
            Some(actual) => drifts.extend(diff_consumer(&resource, spec, &actual)),
        }
    }
    for stream in &topo.streams {
        // Only the owner of the partitions looks them up (a publisher of `USAGE` is not
        // concerned by billing's consumers, nor allowed to list them).
        let owned = topo
            .consumers
            .iter()
            .any(|c| c.stream == stream.name && c.pinned.is_some());
        if let Some(part) = &stream.partitioning
            && owned
            && stream_info(js, stream.name).await?.is_some()
        {
            let state = partitions::partition_state(js, stream.name, part).await?;
            drifts.extend(partitions::stale_drift(stream.name, part, &state));
        }
    }
    Ok(drifts)
}

async fn stream_info(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<stream::Config>, SetupError> {
    match js.get_stream(name).await {
        Ok(mut s) => Ok(Some(
            s.info()
                .await
                .map_err(|e| err(&format!("stream {name}"), e))?
                .config
                .clone(),
        )),
        Err(e) => match e.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(err(&format!("stream {name}"), e)),
        },
    }
}

async fn consumer_info(
    js: &jetstream::Context,
    spec: &ConsumerSpec,
) -> Result<Option<consumer::Config>, SetupError> {
    let resource = format!("consumer {}/{}", spec.stream, spec.durable);
    let Some(_) = stream_info(js, spec.stream).await? else {
        return Ok(None);
    };
    let s = js
        .get_stream_no_info(spec.stream)
        .await
        .map_err(|e| err(&resource, e))?;
    match s.consumer_info(&spec.durable).await {
        Ok(info) => Ok(Some(info.config)),
        Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => Ok(None),
        Err(e) => Err(err(&resource, e)),
    }
}

fn storage(topo: &Topology) -> stream::StorageType {
    match topo.storage {
        StorageKind::File => stream::StorageType::File,
        StorageKind::Memory => stream::StorageType::Memory,
    }
}

/// The JetStream configuration of a stream spec.
pub fn stream_config(spec: &StreamSpec, topo: &Topology) -> stream::Config {
    stream::Config {
        name: spec.name.to_string(),
        description: Some(spec.description.to_string()),
        subjects: spec.subjects.clone(),
        retention: match spec.retention {
            Retention::Limits => stream::RetentionPolicy::Limits,
            Retention::WorkQueue => stream::RetentionPolicy::WorkQueue,
        },
        max_age: spec.max_age,
        duplicate_window: spec.duplicate_window,
        max_message_size: spec.max_message_size,
        storage: storage(topo),
        num_replicas: topo.replicas,
        discard: stream::DiscardPolicy::Old,
        allow_direct: spec.allow_direct,
        allow_atomic_publish: spec.allow_atomic,
        subject_transform: spec
            .partitioning
            .as_ref()
            .map(|p| stream::SubjectTransform {
                source: p.source.clone(),
                destination: p.destination(),
            }),
        ..Default::default()
    }
}

fn object_store_config(spec: &ObjectStoreSpec, topo: &Topology) -> object_store::Config {
    object_store::Config {
        bucket: spec.bucket.to_string(),
        description: Some(spec.description.to_string()),
        max_age: spec.max_age,
        storage: storage(topo),
        num_replicas: topo.replicas,
        ..Default::default()
    }
}

/// What a KV bucket and an object store have in common: age, storage and replicas.
fn diff_store(
    resource: &str,
    max_age: Duration,
    topo: &Topology,
    actual: &stream::Config,
) -> Vec<Drift> {
    let mut d = Vec::new();
    push(
        &mut d,
        resource,
        "max_age",
        secs(max_age),
        secs(actual.max_age),
    );
    push(
        &mut d,
        resource,
        "storage",
        format!("{:?}", storage(topo)),
        format!("{:?}", actual.storage),
    );
    push(
        &mut d,
        resource,
        "num_replicas",
        topo.replicas.to_string(),
        actual.num_replicas.to_string(),
    );
    d
}

fn bucket_config(spec: &BucketSpec, topo: &Topology) -> kv::Config {
    kv::Config {
        bucket: spec.bucket.to_string(),
        description: spec.description.to_string(),
        history: spec.history,
        max_age: spec.max_age,
        storage: storage(topo),
        num_replicas: topo.replicas,
        ..Default::default()
    }
}

pub(crate) fn consumer_config(spec: &ConsumerSpec) -> consumer::pull::Config {
    let filters: Vec<String> = spec.filter_subject.split(',').map(str::to_string).collect();
    let (filter_subject, filter_subjects) = if filters.len() == 1 {
        (filters[0].clone(), Vec::new())
    } else {
        (String::new(), filters)
    };
    consumer::pull::Config {
        durable_name: Some(spec.durable.clone()),
        description: Some(spec.description.clone()),
        filter_subject,
        filter_subjects,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: spec.ack_wait,
        max_deliver: spec.max_deliver,
        max_ack_pending: spec.max_ack_pending,
        deliver_policy: consumer::DeliverPolicy::All,
        priority_policy: if spec.pinned.is_some() {
            consumer::PriorityPolicy::PinnedClient
        } else {
            consumer::PriorityPolicy::None
        },
        priority_groups: spec.pinned.iter().map(|(g, _)| g.clone()).collect(),
        priority_timeout: spec.pinned.as_ref().map(|(_, t)| *t).unwrap_or_default(),
        ..Default::default()
    }
}

fn push(
    drifts: &mut Vec<Drift>,
    resource: &str,
    field: &'static str,
    expected: String,
    actual: String,
) {
    if expected != actual {
        drifts.push(Drift {
            resource: resource.to_string(),
            field,
            expected,
            actual,
        });
    }
}

fn diff_stream(resource: &str, expected: &stream::Config, actual: &stream::Config) -> Vec<Drift> {
    let mut d = Vec::new();
    let sorted = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        v.join(", ")
    };
    push(
        &mut d,
        resource,
        "subjects",
        sorted(&expected.subjects),
        sorted(&actual.subjects),
    );
    push(
        &mut d,
        resource,
        "retention",
        format!("{:?}", expected.retention),
        format!("{:?}", actual.retention),
    );
    push(
        &mut d,
        resource,
        "storage",
        format!("{:?}", expected.storage),
        format!("{:?}", actual.storage),
    );
    push(
        &mut d,
        resource,
        "max_age",
        secs(expected.max_age),
        secs(actual.max_age),
    );
    push(
        &mut d,
        resource,
        "duplicate_window",
        secs(expected.duplicate_window),
        secs(actual.duplicate_window),
    );
    push(
        &mut d,
        resource,
        "max_message_size",
        expected.max_message_size.to_string(),
        actual.max_message_size.to_string(),
    );
    push(
        &mut d,
        resource,
        "num_replicas",
        expected.num_replicas.to_string(),
        actual.num_replicas.to_string(),
    );
    push(
        &mut d,
        resource,
        "discard",
        format!("{:?}", expected.discard),
        format!("{:?}", actual.discard),
    );
    push(
        &mut d,
        resource,
        "allow_direct",
        expected.allow_direct.to_string(),
        actual.allow_direct.to_string(),
    );
    push(
        &mut d,
        resource,
        "allow_atomic",
        expected.allow_atomic_publish.to_string(),
        actual.allow_atomic_publish.to_string(),
    );
    let transform = |t: &Option<stream::SubjectTransform>| {
        t.as_ref()
            .map(|t| format!("{} -> {}", t.source, t.destination))
            .unwrap_or_else(|| "none".into())
    };
    push(
        &mut d,
        resource,
        "subject_transform",
        transform(&expected.subject_transform),
        transform(&actual.subject_transform),
    );
    d
}

fn diff_bucket(
    resource: &str,
    spec: &BucketSpec,
    topo: &Topology,
    actual: &stream::Config,
) -> Vec<Drift> {
    let mut d = Vec::new();
    push(
        &mut d,
        resource,
        "history",
        spec.history.to_string(),
        actual.max_messages_per_subject.to_string(),
    );
    d.extend(diff_store(resource, spec.max_age, topo, actual));
    d
}

fn diff_consumer(resource: &str, spec: &ConsumerSpec, actual: &consumer::Config) -> Vec<Drift> {
    let mut d = Vec::new();
    let mut filters: Vec<String> = if actual.filter_subjects.is_empty() {
        vec![actual.filter_subject.clone()]
    } else {
        actual.filter_subjects.clone()
    };
    filters.sort();
    push(
        &mut d,
        resource,
        "filter_subject",
        spec.filter_subject.clone(),
        filters.join(","),
    );
    push(
        &mut d,
        resource,
        "ack_policy",
        "Explicit".into(),
        format!("{:?}", actual.ack_policy),
    );
    push(
        &mut d,
        resource,
        "ack_wait",
        secs(spec.ack_wait),
        secs(actual.ack_wait),
    );
    push(
        &mut d,
        resource,
        "max_deliver",
        spec.max_deliver.to_string(),
        actual.max_deliver.to_string(),
    );
    push(
        &mut d,
        resource,
        "max_ack_pending",
        spec.max_ack_pending.to_string(),
        actual.max_ack_pending.to_string(),
    );
    let (policy, groups, timeout) = match &spec.pinned {
        Some((group, timeout)) => ("PinnedClient", group.clone(), secs_ms(*timeout)),
        None => ("None", String::new(), secs_ms(Duration::ZERO)),
    };
    push(
        &mut d,
        resource,
        "priority_policy",
        policy.into(),
        format!("{:?}", actual.priority_policy),
    );
    push(
        &mut d,
        resource,
        "priority_groups",
        groups,
        actual.priority_groups.join(","),
    );
    push(
        &mut d,
        resource,
        "priority_timeout",
        timeout,
        secs_ms(actual.priority_timeout),
    );
    d
}

fn secs_ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs())
}
