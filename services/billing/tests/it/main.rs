//! Billing over real processes: a nats-server with the topology set up, usage events published
//! by the test as the producers would, and billing folding them (in this process, or its binary
//! killed at failpoints). What counts is counted at the streams: `BILLED` messages and their
//! quantities, `USAGE_REJECTED` messages; expected values come from the generator's own inputs.
#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise.

mod crash;
mod dedupe;
mod fold;
mod generator;
mod property;
mod window;

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use slipway_proto::v1::BilledUsage;
use slipway_test_support::NatsServer;

/// Settings of every test: quick takeovers and redeliveries.
pub const ENV: [(&str, &str); 3] = [
    ("SLIPWAY__SETUP__PRIORITY_TIMEOUT_MS", "2000"),
    ("SLIPWAY__SETUP__PARTITION_ACK_WAIT_SEC", "3"),
    ("SLIPWAY__HEALTH__LISTEN", "127.0.0.1:0"),
];

/// A nats-server with the topology applied under `env`'s settings.
pub struct Bus {
    pub nats: NatsServer,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub env: Vec<(String, String)>,
}

impl Bus {
    pub async fn start(extra: &[(&str, &str)]) -> Self {
        let nats = NatsServer::start().unwrap();
        let mut env: Vec<(String, String)> = ENV
            .iter()
            .chain(extra)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.push(("SLIPWAY__NATS__URL".into(), nats.url()));
        let (_, client) = slipway_test_support::set_up_topology(&nats.url(), &env)
            .await
            .unwrap();
        let js = jetstream::new(client.clone());
        Self {
            nats,
            client,
            js,
            env,
        }
    }

    /// A billing replica in this process.
    pub async fn billing(&self) -> slipway_test_support::Spawned {
        let mut spawn =
            slipway_test_support::Spawn::new(slipway_common::Service::Billing).on_nats(&self.nats);
        for (k, v) in &self.env {
            spawn = spawn.env(k, v);
        }
        spawn.in_process(slipway_billing::serve).await.unwrap()
    }

    /// Every message of `BILLED`, decoded, in order (read with an ordered consumer).
    pub async fn billed(&self) -> Vec<BilledUsage> {
        let n = self.count("BILLED").await as usize;
        if n == 0 {
            return Vec::new();
        }
        let stream = self.js.get_stream("BILLED").await.unwrap();
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
            .await
            .unwrap();
        let mut messages = consumer.messages().await.unwrap();
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let m = tokio::time::timeout(Duration::from_secs(30), messages.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            out.push(
                slipway_common::rpc::decode_message::<BilledUsage>(m.headers.as_ref(), &m.payload)
                    .unwrap(),
            );
        }
        out
    }

    /// How many messages a stream holds.
    pub async fn count(&self, stream: &str) -> u64 {
        self.js
            .get_stream(stream)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages
    }

    /// Waits (bounded) until `BILLED` holds `billed` messages, `USAGE_REJECTED` `rejected`,
    /// and no partition has anything pending or unacknowledged.
    pub async fn settled(&self, billed: u64, rejected: u64, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let (b, r) = (
                self.count("BILLED").await,
                self.count("USAGE_REJECTED").await,
            );
            if b == billed && r == rejected && self.idle().await {
                return;
            }
            assert!(
                b <= billed,
                "BILLED holds {b} messages, more than the {billed} accepted events"
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "not settled: BILLED {b} of {billed}, USAGE_REJECTED {r} of {rejected}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Per (user, meter), the quantities billing's aggregate records hold.
    pub async fn aggregates(&self) -> Totals {
        let kv = self.js.get_key_value("slipway_billing").await.unwrap();
        let mut sums = Totals::new();
        let mut keys = kv.keys().await.unwrap();
        while let Some(k) = keys.next().await {
            let k = k.unwrap();
            if !k.starts_with("agg.") {
                continue;
            }
            let bytes = kv.get(&k).await.unwrap().unwrap();
            let agg: slipway_proto::v1::UsageAggregate =
                slipway_common::records::decode(&k, &bytes).unwrap();
            for (row, r) in &agg.rows {
                let meter = row.split('|').nth(1).unwrap().to_string();
                *sums.entry((agg.user_id.clone(), meter)).or_insert(0) +=
                    generator::nanos(&r.quantity);
            }
        }
        sums
    }

    /// No partition consumer has a message pending or unacknowledged.
    pub async fn idle(&self) -> bool {
        let mut stream = self.js.get_stream("USAGE").await.unwrap();
        let names: Vec<String> = stream.consumer_names().map(|n| n.unwrap()).collect().await;
        for name in names {
            let info = stream.consumer_info(&name).await.unwrap().clone();
            if info.num_pending > 0 || info.num_ack_pending > 0 {
                return false;
            }
        }
        let _ = &mut stream;
        true
    }
}

/// (user id, meter) -> nano-units.
pub type Totals = BTreeMap<(String, String), u128>;

/// Per (user, meter), the sum of the quantities `BILLED` holds, and the (source, id) pairs in it.
pub fn totals(billed: &[BilledUsage]) -> (Totals, Vec<(String, String)>) {
    let mut sums = BTreeMap::new();
    let mut ids = Vec::new();
    for b in billed {
        let e = b.event.as_ref().unwrap();
        *sums
            .entry((e.subject.clone(), e.meter.clone()))
            .or_insert(0) += generator::nanos(&e.quantity);
        ids.push((e.source.clone(), e.id.clone()));
    }
    (sums, ids)
}
