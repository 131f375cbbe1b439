//! The generator: usage events for many users over every meter, with duplicates (the same
//! event under another `Nats-Msg-Id`, some an hour later in event time), invalid events, and
//! times out of order; and the totals billing must arrive at, from these inputs alone.

use std::collections::BTreeMap;

use async_nats::HeaderMap;
use slipway_common::rpc::message_headers;
use slipway_proto::codec::{ContentType, encode};
use slipway_proto::meters::{CATALOGUE, Kind};
use slipway_proto::v1::UsageEvent;

/// SplitMix64: a small seeded generator, so a failing case can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A quantity in nano-units.
pub fn nanos(q: &str) -> u128 {
    let (w, f) = q.split_once('.').unwrap_or((q, ""));
    let mut frac = f.to_string();
    while frac.len() < 9 {
        frac.push('0');
    }
    w.parse::<u128>().unwrap() * 1_000_000_000 + frac.parse::<u128>().unwrap()
}

/// One message to publish.
pub struct Publish {
    pub subject: String,
    pub msg_id: String,
    pub event: UsageEvent,
}

pub struct Plan {
    pub messages: Vec<Publish>,
    /// (user id, meter) -> nano-units, over the accepted events.
    pub expected: BTreeMap<(String, String), u128>,
    pub accepted: u64,
    pub invalid: u64,
}

pub fn user(k: u64) -> String {
    // Ids with `.` and `@`: the subject token is their encoding.
    if k.is_multiple_of(3) {
        format!("user{k}@example.com")
    } else {
        format!("u{k}")
    }
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub fn subject(service: &str, meter: &str, user_id: &str) -> String {
    format!(
        "slipway.usage.{service}.{meter}.{}",
        slipway_common::subjects::user_token(user_id).unwrap()
    )
}

/// An event of `meter` for `user_id`, its id a fact of `n`.
pub fn event(rng: &mut Rng, n: u64, user_id: &str, meter_index: usize) -> (String, UsageEvent) {
    let meter = &CATALOGUE[meter_index];
    let id = match meter.kind {
        Kind::Cumulative => format!("sbx{n}:{}:{}-{}", meter.name, n * 10, n * 10 + 7),
        Kind::Delta => format!("run{n}:step:{}:{}", n % 7, meter.name),
    };
    let quantity = if rng.below(4) == 0 {
        format!("{}.{}", rng.below(1000), 1 + rng.below(99))
    } else {
        (1 + rng.below(100_000)).to_string()
    };
    // Between 3 days and 2 hours ago, in no order.
    let t = now_s() - 7200 - rng.below(3 * 86_400 - 7200) as i64;
    let e = UsageEvent {
        id,
        source: format!("slipway/{}", meter.producer),
        r#type: "slipway.usage.v1".into(),
        subject: user_id.to_string(),
        time: Some(pbjson_types::Timestamp {
            seconds: t,
            nanos: 0,
        }),
        spec_version: "1.0".into(),
        meter: meter.name.into(),
        quantity,
        unit: meter.unit.into(),
        ..Default::default()
    };
    (subject(meter.producer, meter.name, user_id), e)
}

/// `n` messages for `users` users: about 10% duplicates and 1% invalid.
pub fn plan(n: u64, users: u64, seed: u64) -> Plan {
    let mut rng = Rng::new(seed);
    let mut messages: Vec<Publish> = Vec::with_capacity(n as usize);
    let mut originals: Vec<usize> = Vec::new();
    let mut expected = BTreeMap::new();
    let (mut accepted, mut invalid) = (0, 0);
    for k in 0..n {
        let roll = rng.below(100);
        if roll < 10 && !originals.is_empty() {
            // A duplicate: the same event again, under another message id; half of them an hour
            // later in event time (still the same fact: first wins).
            let of = originals[rng.below(originals.len() as u64) as usize];
            let mut e = messages[of].event.clone();
            if rng.below(2) == 0
                && let Some(t) = e.time.as_mut()
            {
                t.seconds += 3600;
            }
            let subject = messages[of].subject.clone();
            messages.push(Publish {
                subject,
                msg_id: format!("dup-{k}"),
                event: e,
            });
            continue;
        }
        let uid = user(rng.below(users));
        let meter = rng.below(CATALOGUE.len() as u64) as usize;
        let (subject, mut e) = event(&mut rng, k, &uid, meter);
        if roll == 10 {
            invalid += 1;
            let subject = match rng.below(4) {
                0 => {
                    e.meter = "bogus".into();
                    let mut t: Vec<&str> = subject.split('.').collect();
                    t[3] = "bogus";
                    t.join(".")
                }
                1 => {
                    e.unit = "parsecs".into();
                    subject
                }
                2 => {
                    e.quantity = "-3".into();
                    subject
                }
                _ => {
                    if let Some(t) = e.time.as_mut() {
                        t.seconds -= 40 * 86_400;
                    }
                    subject
                }
            };
            messages.push(Publish {
                subject,
                msg_id: format!("m-{k}"),
                event: e,
            });
            continue;
        }
        accepted += 1;
        *expected.entry((uid, e.meter.clone())).or_insert(0) += nanos(&e.quantity);
        originals.push(messages.len());
        messages.push(Publish {
            subject,
            msg_id: format!("m-{k}"),
            event: e,
        });
    }
    Plan {
        messages,
        expected,
        accepted,
        invalid,
    }
}

/// Publishes every message, awaiting the stream's acks in chunks.
pub async fn publish(js: &async_nats::jetstream::Context, messages: &[Publish]) {
    for chunk in messages.chunks(500) {
        let mut acks = Vec::with_capacity(chunk.len());
        for m in chunk {
            let mut headers: HeaderMap = message_headers::<UsageEvent>(ContentType::Protobuf);
            headers.insert("Nats-Msg-Id", m.msg_id.as_str());
            let ack = js
                .publish_with_headers(
                    m.subject.clone(),
                    headers,
                    encode(&m.event, ContentType::Protobuf).into(),
                )
                .await
                .unwrap();
            acks.push(ack);
        }
        for a in acks {
            a.await.unwrap();
        }
    }
}
