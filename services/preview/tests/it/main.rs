//! The preview service over real processes: a nats-server, a sandboxd with its edge, the
//! executor and two preview replicas (in this process, through the kit's spawn helper; the
//! crash test runs the preview's binary). Previews and links are counted at sandboxd, events in
//! `RUN_EVENTS`, links tried through the edge.
#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise.

mod browser;
mod files;
mod inputs;
mod links;
mod previews;

use std::time::Duration;

use serde_json::Value;
use slipway_common::{RpcClient, RpcError, Service};
use slipway_proto::v1::run_event::Payload;
use slipway_proto::v1::*;
use slipway_test_support::{Spawn, Spawned, streams};

const SERVER: &str = include_str!("../../../../tests/fixtures/preview-app/server.js");
const APP: &str = include_str!("../../../../tests/fixtures/preview-app/app.js");
pub const PAGE: &str = include_str!("../../../../tests/fixtures/preview-app/index.html");

/// Settings every replica gets: the browser API on a free port, a quick sweeper, short tickets
/// where a test asks.
const PREVIEW_ENV: [(&str, &str); 2] = [
    ("SLIPWAY__PREVIEW__LISTEN", "127.0.0.1:0"),
    ("SLIPWAY__PREVIEW__SWEEP_INTERVAL_MS", "200"),
];

pub struct System {
    pub executor: Spawned,
    pub replicas: Vec<Spawned>,
}

impl System {
    pub async fn start(replicas: usize, extra: &[(&str, &str)]) -> Self {
        let executor = Spawn::new(Service::Executor)
            .with_sandboxd()
            .in_process(slipway_executor::serve)
            .await
            .unwrap();
        let mut sys = Self {
            executor,
            replicas: Vec::new(),
        };
        for _ in 0..replicas {
            sys.add_replica(extra).await;
        }
        sys
    }

    pub async fn add_replica(&mut self, extra: &[(&str, &str)]) {
        let mut spawn = Spawn::new(Service::Preview).on_nats(self.executor.nats.as_ref().unwrap());
        for (k, v) in PREVIEW_ENV.iter().chain(extra) {
            spawn = spawn.env(k, v);
        }
        self.replicas
            .push(spawn.in_process(slipway_preview::serve).await.unwrap());
    }

    pub fn rpc(&self) -> &RpcClient {
        &self.replicas[0].rpc
    }

    pub fn sandboxd(&self) -> &slipway_test_support::Sandboxd {
        self.executor.sandboxd.as_ref().unwrap()
    }

    pub fn edge(&self) -> reqwest::Client {
        self.sandboxd().edge_http()
    }

    pub async fn call<Req: slipway_proto::WireMessage, Resp: slipway_proto::WireMessage>(
        &self,
        op: &str,
        req: &Req,
    ) -> Result<Resp, RpcError> {
        self.rpc().call(&Service::Preview.op(op), req).await
    }

    /// A node sandbox for `run`'s `branch`, serving the test app on port 3000.
    pub async fn app(&self, run: &str, branch: &str) -> String {
        let rpc = &self.executor.rpc;
        let created: SandboxReply = rpc
            .call(
                &Service::Executor.op("sandbox.create"),
                &CreateSandboxRequest {
                    idempotency_key: format!("{run}:{branch}:sandbox"),
                    run_id: run.into(),
                    branch: branch.into(),
                    attribution: Some(Attribution {
                        user_id: "user-1".into(),
                        ..Default::default()
                    }),
                    template_id: "node".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let id = created.sandbox.unwrap().id;
        let files = [
            ("server.js", SERVER),
            ("app.js", APP),
            ("public/index.html", PAGE),
        ];
        let _: WriteFilesReply = rpc
            .call(
                &Service::Executor.op("files.write_many"),
                &WriteFilesRequest {
                    sandbox_id: id.clone(),
                    idempotency_key: format!("{run}:{branch}:files"),
                    files: files
                        .iter()
                        .map(|(p, c)| FileContent {
                            path: (*p).into(),
                            content: c.as_bytes().to_vec(),
                            mode: 0,
                        })
                        .collect(),
                },
            )
            .await
            .unwrap();
        let _: ProcessReply = rpc
            .call(
                &Service::Executor.op("process.start"),
                &StartProcessRequest {
                    sandbox_id: id.clone(),
                    idempotency_key: format!("{run}:{branch}:dev"),
                    command: "node server.js".into(),
                    env: [("PORT".to_string(), "3000".to_string())].into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        id
    }

    /// Writes `path` inside the sandbox, as the planner's patches do.
    pub async fn write(&self, sandbox: &str, key: &str, path: &str, content: &str) {
        let _: WriteFilesReply = self
            .executor
            .rpc
            .call(
                &Service::Executor.op("files.write_many"),
                &WriteFilesRequest {
                    sandbox_id: sandbox.into(),
                    idempotency_key: key.into(),
                    files: vec![FileContent {
                        path: path.into(),
                        content: content.as_bytes().to_vec(),
                        mode: 0,
                    }],
                },
            )
            .await
            .unwrap();
    }

    pub async fn open(&self, run: &str, branch: &str, sandbox: &str) -> OpenPreviewReply {
        self.call(
            "open",
            &OpenPreviewRequest {
                run_id: run.into(),
                branch: branch.into(),
                port: 3000,
                sandbox_id: sandbox.into(),
            },
        )
        .await
        .unwrap()
    }

    pub async fn share(&self, run: &str, key: &str, ttl: u64) -> ShareLink {
        let r: ShareLinkReply = self
            .call(
                "share.create",
                &CreateShareLinkRequest {
                    run_id: run.into(),
                    branch: "main".into(),
                    ttl_sec: ttl,
                    idempotency_key: key.into(),
                },
            )
            .await
            .unwrap();
        r.share.unwrap()
    }

    pub async fn close(&self, run: &str) -> ClosePreviewsReply {
        self.call("close", &ClosePreviewsRequest { run_id: run.into() })
            .await
            .unwrap()
    }

    pub async fn revoke(
        &self,
        run: &str,
        share_id: &str,
    ) -> Result<RevokeShareLinkReply, RpcError> {
        self.call(
            "share.revoke",
            &RevokeShareLinkRequest {
                run_id: run.into(),
                share_id: share_id.into(),
            },
        )
        .await
    }

    /// The run's events in `RUN_EVENTS`, in order (the source of truth).
    pub async fn events(&self, run: &str) -> Vec<RunEvent> {
        let js = async_nats::jetstream::new(self.executor.nats_client.clone());
        streams::messages::<RunEvent>(&js, "RUN_EVENTS")
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.run_id == run)
            .collect()
    }

    /// The links `share_expired` was published for, in order.
    pub async fn expired_shares(&self, run: &str) -> Vec<String> {
        self.events(run)
            .await
            .into_iter()
            .filter_map(|e| match e.payload {
                Some(Payload::ShareExpired(x)) => Some(x.share_id),
                _ => None,
            })
            .collect()
    }

    pub async fn count(&self, run: &str, kind: fn(&Payload) -> bool) -> usize {
        self.events(run)
            .await
            .iter()
            .filter(|e| e.payload.as_ref().is_some_and(kind))
            .count()
    }

    /// Waits (bounded) until the run has `n` events of `kind`.
    pub async fn wait_for(&self, run: &str, kind: fn(&Payload) -> bool, n: usize) {
        for _ in 0..300 {
            if self.count(run, kind).await >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "run {run}: {} events of the kind, expected {n}",
            self.count(run, kind).await
        );
    }

    /// GET at sandboxd's API (the platform, the source of truth).
    pub async fn platform(&self, path: &str) -> Value {
        slipway_test_support::http()
            .get(format!("{}{path}", self.sandboxd().base_url()))
            .bearer_auth("msk_test")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The live previews of a sandbox at sandboxd.
    pub async fn platform_previews(&self, sandbox: &str) -> Vec<Value> {
        self.platform(&format!("/sandboxes/{sandbox}/previews"))
            .await["data"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The status an edge URL answers once the app is up (a 502 while it starts is waited out).
    pub async fn status(&self, url: &str) -> (u16, String) {
        let edge = self.edge();
        for _ in 0..300 {
            let r = edge.get(url).send().await.unwrap();
            let status = r.status().as_u16();
            if status != 502 {
                return (status, r.text().await.unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{url} kept answering 502");
    }
}

pub fn is_files_changed(p: &Payload) -> bool {
    matches!(p, Payload::FilesChanged(_))
}

pub fn is_preview_ready(p: &Payload) -> bool {
    matches!(p, Payload::PreviewReady(_))
}

pub fn code(e: &RpcError) -> ErrorCode {
    e.service_error()
        .map(|s| s.code)
        .unwrap_or(ErrorCode::Unspecified)
}

pub fn message(e: &RpcError) -> String {
    e.service_error()
        .map(|s| s.message.clone())
        .unwrap_or_else(|| e.to_string())
}
