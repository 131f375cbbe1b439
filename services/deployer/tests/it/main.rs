//! The deployer over real processes: a nats-server, a sandboxd with its edge, the executor and
//! the deployer (both in this process, through the kit's spawn helper). Versions are counted at
//! sandboxd, events in `RUN_EVENTS`, usage in `USAGE`.
#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise.

use std::time::Duration;

use slipway_common::{RpcClient, Service};
use slipway_proto::v1::run_event::Payload;
use slipway_proto::v1::*;
use slipway_test_support::{Spawn, Spawned, streams};

/// The executor with its sandboxd, and the deployer on the same nats-server.
struct System {
    executor: Spawned,
    deployer: Spawned,
}

impl System {
    async fn start(extra: &[(&str, &str)]) -> Self {
        let mut executor = Spawn::new(Service::Executor).with_sandboxd();
        for (k, v) in extra {
            executor = executor.env(k, v);
        }
        let executor = executor.in_process(slipway_executor::serve).await.unwrap();
        let edge = executor.sandboxd.as_ref().unwrap().edge_addr().to_string();
        let mut deployer = Spawn::new(Service::Deployer)
            .on_nats(executor.nats.as_ref().unwrap())
            .env("SLIPWAY__EDGE__RESOLVE", &edge)
            .env("SLIPWAY__DEPLOYER__VERIFY_TIMEOUT_MS", "15000");
        for (k, v) in extra {
            deployer = deployer.env(k, v);
        }
        let deployer = deployer.in_process(slipway_deployer::serve).await.unwrap();
        Self { executor, deployer }
    }

    fn rpc(&self) -> &RpcClient {
        &self.deployer.rpc
    }

    fn edge(&self) -> reqwest::Client {
        self.executor.sandboxd.as_ref().unwrap().edge_http()
    }

    /// A sandbox with `site/index.html` = `page`.
    async fn sandbox(&self, key: &str, page: &str) -> String {
        let id = create_sandbox(&self.executor.rpc, key, "run_d").await;
        self.write(&id, key, page).await;
        id
    }

    async fn write(&self, id: &str, key: &str, page: &str) {
        write_page(&self.executor.rpc, id, key, page).await;
    }

    async fn deploy(&self, req: EnqueueDeployRequest) -> Result<String, slipway_common::RpcError> {
        self.rpc()
            .call::<_, EnqueueDeployReply>("slipway.deployer.v1.deploy", &req)
            .await
            .map(|r| r.job_id)
    }

    /// The run's events in `RUN_EVENTS`, in order.
    async fn events(&self) -> Vec<RunEvent> {
        let js = async_nats::jetstream::new(self.deployer.nats_client.clone());
        streams::messages(&js, "RUN_EVENTS").await.unwrap()
    }

    /// Waits for the job's outcome event.
    async fn outcome(&self, job: &str) -> Payload {
        for _ in 0..600 {
            for e in self.events().await {
                match e.payload {
                    Some(Payload::Deployed(d)) if d.job_id == job => return Payload::Deployed(d),
                    Some(Payload::DeployFailed(f)) if f.job_id == job => {
                        return Payload::DeployFailed(f);
                    }
                    _ => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no outcome for job {job}");
    }

    /// Versions of `deployment` at sandboxd (the source of truth).
    async fn versions_at_sandboxd(&self, deployment: &str) -> Vec<serde_json::Value> {
        let sd = self.executor.sandboxd.as_ref().unwrap();
        let v: serde_json::Value = slipway_test_support::http()
            .get(format!(
                "{}/deployments/{deployment}/versions",
                sd.base_url()
            ))
            .bearer_auth("msk_test")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["data"].as_array().cloned().unwrap_or_default()
    }
}

/// A node sandbox for `run`, created through the executor.
async fn create_sandbox(rpc: &RpcClient, key: &str, run: &str) -> String {
    let created: SandboxReply = rpc
        .call(
            "slipway.executor.v1.sandbox.create",
            &CreateSandboxRequest {
                idempotency_key: key.into(),
                run_id: run.into(),
                attribution: Some(user()),
                template_id: "node".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    created.sandbox.unwrap().id
}

/// Writes `site/index.html` = `page` into sandbox `id`.
async fn write_page(rpc: &RpcClient, id: &str, key: &str, page: &str) {
    let _: WriteFilesReply = rpc
        .call(
            "slipway.executor.v1.files.write_many",
            &WriteFilesRequest {
                sandbox_id: id.into(),
                idempotency_key: format!("{key}:{page}"),
                files: vec![FileContent {
                    path: "/workspace/site/index.html".into(),
                    content: page.as_bytes().to_vec(),
                    mode: 0,
                }],
            },
        )
        .await
        .unwrap();
}

fn user() -> Attribution {
    Attribution {
        user_id: "deploy-user".into(),
        project_id: "p".into(),
        workspace_id: String::new(),
    }
}

fn request(sandbox: &str, key: &str) -> EnqueueDeployRequest {
    EnqueueDeployRequest {
        run_id: "run_d".into(),
        sandbox_id: sandbox.into(),
        name: "shop".into(),
        output_path: "/workspace/site".into(),
        idempotency_key: key.into(),
        attribution: Some(user()),
        ..Default::default()
    }
}

fn deployed(p: Payload) -> Deployed {
    match p {
        Payload::Deployed(d) => d,
        other => panic!("expected deployed, got {other:?}"),
    }
}

#[tokio::test]
async fn versions_roll_back_and_forward_and_each_is_verified_and_counted_once() {
    let sys = System::start(&[]).await;
    let sb = sys.sandbox("d:sb", "<p>one</p>").await;
    let one = deployed(
        sys.outcome(&sys.deploy(request(&sb, "d:1")).await.unwrap())
            .await,
    );
    assert_eq!(one.version, 1);
    sys.write(&sb, "d", "<p>two</p>").await;
    let two = deployed(
        sys.outcome(&sys.deploy(request(&sb, "d:2")).await.unwrap())
            .await,
    );
    assert_eq!(
        (two.version, two.deployment_id.as_str()),
        (2, one.deployment_id.as_str()),
        "the same name is the next version of the same deployment"
    );
    let page = |url: String| {
        let http = sys.edge();
        async move {
            let r = http.get(url).send().await.unwrap();
            let digest = r.headers()["x-slipway-artifact"]
                .to_str()
                .unwrap()
                .to_string();
            (r.text().await.unwrap(), digest)
        }
    };
    assert_eq!(
        page(two.url.clone()).await,
        ("<p>two</p>".into(), two.digest.clone())
    );
    let back: ServeVersionReply = sys
        .rpc()
        .call(
            "slipway.deployer.v1.rollback",
            &ServeVersionRequest {
                deployment_id: one.deployment_id.clone(),
                version: 0,
                idempotency_key: "d:rollback".into(),
                run_id: "run_d".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(back.version.unwrap().number, 1);
    assert_eq!(
        page(one.url.clone()).await,
        ("<p>one</p>".into(), one.digest.clone())
    );
    let forward: ServeVersionReply = sys
        .rpc()
        .call(
            "slipway.deployer.v1.promote",
            &ServeVersionRequest {
                deployment_id: one.deployment_id.clone(),
                version: 2,
                idempotency_key: "d:promote".into(),
                run_id: "run_d".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(forward.version.unwrap().number, 2);
    // Promoting again finds nothing newer to serve.
    let e = sys
        .rpc()
        .call::<_, ServeVersionReply>(
            "slipway.deployer.v1.promote",
            &ServeVersionRequest {
                deployment_id: one.deployment_id.clone(),
                version: 0,
                idempotency_key: "d:promote:again".into(),
                run_id: "run_d".into(),
            },
        )
        .await
        .unwrap_err();
    assert!(format!("{e}").contains("version"), "{e}");
    assert_eq!(page(two.url.clone()).await.0, "<p>two</p>");
    // Counted at the source of truth: two versions at sandboxd; one `deployed` per job; one
    // `deploys` per version in USAGE.
    assert_eq!(sys.versions_at_sandboxd(&one.deployment_id).await.len(), 2);
    let events = sys.events().await;
    let count = |f: &dyn Fn(&Payload) -> bool| {
        events
            .iter()
            .filter(|e| e.payload.as_ref().is_some_and(f))
            .count()
    };
    assert_eq!(count(&|p| matches!(p, Payload::Deployed(_))), 2);
    assert_eq!(count(&|p| matches!(p, Payload::RolledBack(_))), 1);
    assert_eq!(count(&|p| matches!(p, Payload::Promoted(_))), 1);
    let js = async_nats::jetstream::new(sys.deployer.nats_client.clone());
    let usage: Vec<UsageEvent> = streams::messages(&js, "USAGE").await.unwrap();
    let deploys = usage.iter().filter(|e| e.meter == "deploys").count();
    assert_eq!(deploys, 2);
    // The queries.
    let detail: DeploymentDetail = sys
        .rpc()
        .call(
            "slipway.deployer.v1.deployment.get",
            &GetDeploymentDetailRequest {
                deployment_id: one.deployment_id.clone(),
            },
        )
        .await
        .unwrap();
    assert_eq!(detail.versions.len(), 2);
    assert_eq!(
        detail.deployment.unwrap().current_version_id,
        detail.versions[1].id,
        "serving v2 again after the promote"
    );
    assert_eq!(detail.run_id, "run_d");
    let listed: ListDeploymentsReply = sys
        .rpc()
        .call(
            "slipway.deployer.v1.deployments.list",
            &ListDeploymentsRequest {
                user_id: "deploy-user".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(listed.deployments.len(), 1);
    // Jobs by outcome, build and verification times, the queue's depth.
    let text = sys.deployer.metrics().await.unwrap();
    assert!(
        text.contains("slipway_deploy_jobs_total{outcome=\"deployed\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("slipway_deploy_build_seconds_count 2"),
        "{text}"
    );
    assert!(
        text.contains("slipway_deploy_verify_seconds_count 2"),
        "{text}"
    );
    assert!(
        text.contains("slipway_consumer_messages_total{stream=\"DEPLOY_JOBS\""),
        "{text}"
    );
}

#[tokio::test]
async fn a_failing_build_is_reported_with_its_log_and_changes_nothing_served() {
    let sys = System::start(&[]).await;
    let sb = sys.sandbox("f:sb", "<p>good</p>").await;
    let good = deployed(
        sys.outcome(&sys.deploy(request(&sb, "f:1")).await.unwrap())
            .await,
    );
    let mut bad = request(&sb, "f:2");
    bad.build_command = "echo the-build-broke >&2; exit 3".into();
    bad.destroy_source = true;
    let failed = match sys.outcome(&sys.deploy(bad).await.unwrap()).await {
        Payload::DeployFailed(f) => f,
        other => panic!("expected a failure, got {other:?}"),
    };
    assert!(failed.log_tail.contains("the-build-broke"), "{failed:?}");
    let served = sys
        .edge()
        .get(good.url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(served, "<p>good</p>");
    // A failed deploy never destroys its source, even when asked to on success.
    let got: SandboxReply = sys
        .executor
        .rpc
        .call(
            "slipway.executor.v1.sandbox.get",
            &GetSandboxRequest {
                sandbox_id: sb,
                name: String::new(),
            },
        )
        .await
        .unwrap();
    assert_eq!(got.sandbox.unwrap().state, SandboxState::Running as i32);
}

#[tokio::test]
async fn bad_requests_are_refused_with_no_job_and_a_finished_key_is_the_same_job() {
    // A duplicate window of a second: the same key later must still be the same job.
    let sys = System::start(&[("SLIPWAY__SETUP__DUPLICATE_WINDOW_SEC", "1")]).await;
    let sb = sys.sandbox("b:sb", "<p>b</p>").await;
    let mut cases = Vec::new();
    let mut r = request("sbx_nope", "b:1");
    cases.push(("sandbox_id", r.clone()));
    r = request(&sb, "b:2");
    r.name = "Bad Name!".into();
    cases.push(("name", r));
    r = request(&sb, "b:3");
    r.output_path = String::new();
    cases.push(("output_path", r));
    r = request(&sb, "b:4");
    r.run_command = "node server.js".into();
    cases.push(("port", r));
    for (field, req) in cases {
        let e = sys.deploy(req.clone()).await.unwrap_err();
        let message = e
            .service_error()
            .map(|s| s.message.clone())
            .unwrap_or_default();
        assert!(message.contains(field), "{field}: {e}");
        // No job recorded for it.
        let js = async_nats::jetstream::new(sys.deployer.nats_client.clone());
        let kv = js.get_key_value("slipway_deployments").await.unwrap();
        let key = format!(
            "job.{}",
            slipway_deployer::service::job_id("deploy-user", &req.idempotency_key)
        );
        assert!(
            kv.get(&key).await.unwrap().is_none(),
            "{field}: a job was recorded"
        );
    }
    let job = sys.deploy(request(&sb, "b:ok")).await.unwrap();
    let first = deployed(sys.outcome(&job).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = sys.deploy(request(&sb, "b:ok")).await.unwrap();
    assert_eq!(again, job, "the same key is the same job");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        sys.versions_at_sandboxd(&first.deployment_id).await.len(),
        1
    );
}

const SERVER: &str = include_str!("../../../../tests/fixtures/preview-app/server.js");
const APP: &str = include_str!("../../../../tests/fixtures/preview-app/app.js");
const PAGE: &str = include_str!("../../../../tests/fixtures/preview-app/index.html");

#[tokio::test]
async fn a_dynamic_deploy_serves_after_its_source_sandbox_is_destroyed() {
    let sys = System::start(&[]).await;
    let sb = sys.sandbox("dyn:sb", "<p>unused</p>").await;
    let _: WriteFilesReply = sys
        .executor
        .rpc
        .call(
            "slipway.executor.v1.files.write_many",
            &WriteFilesRequest {
                sandbox_id: sb.clone(),
                idempotency_key: "dyn:app".into(),
                files: [
                    ("/workspace/app/server.js", SERVER),
                    ("/workspace/app/app.js", APP),
                    ("/workspace/app/public/index.html", PAGE),
                ]
                .into_iter()
                .map(|(path, body)| FileContent {
                    path: path.into(),
                    content: body.as_bytes().to_vec(),
                    mode: 0,
                })
                .collect(),
            },
        )
        .await
        .unwrap();
    let mut req = request(&sb, "dyn:1");
    req.name = "dyn".into();
    req.output_path = "/workspace/app".into();
    req.run_command = "node server.js".into();
    req.port = 3000;
    req.destroy_source = true;
    let done = deployed(sys.outcome(&sys.deploy(req).await.unwrap()).await);
    assert!(done.source_destroyed);
    // The source goes (after the event), and the app keeps answering from its own runtime.
    let mut state = 0;
    for _ in 0..200 {
        let got: SandboxReply = sys
            .executor
            .rpc
            .call(
                "slipway.executor.v1.sandbox.get",
                &GetSandboxRequest {
                    sandbox_id: sb.clone(),
                    name: String::new(),
                },
            )
            .await
            .unwrap();
        state = got.sandbox.unwrap().state;
        if state == SandboxState::Destroyed as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state, SandboxState::Destroyed as i32);
    let page = sys.edge().get(&done.url).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("VERSION_ONE"));
}

#[tokio::test]
async fn a_deployment_taken_down_is_refused_at_once_and_its_name_deploys_anew() {
    let sys = System::start(&[]).await;
    let sb = sys.sandbox("down:sb", "<p>up</p>").await;
    let first = deployed(
        sys.outcome(&sys.deploy(request(&sb, "down:1")).await.unwrap())
            .await,
    );
    assert_eq!(
        sys.edge().get(&first.url).send().await.unwrap().status(),
        200
    );
    let _: TakeDownReply = sys
        .rpc()
        .call(
            "slipway.deployer.v1.deployment.delete",
            &TakeDownRequest {
                deployment_id: first.deployment_id.clone(),
                idempotency_key: "down:take".into(),
                reason: "abuse report".into(),
            },
        )
        .await
        .unwrap();
    let status = sys
        .edge()
        .get(&first.url)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    assert!(matches!(status, 404 | 410), "still served: {status}");
    let again = deployed(
        sys.outcome(&sys.deploy(request(&sb, "down:2")).await.unwrap())
            .await,
    );
    assert_ne!(again.deployment_id, first.deployment_id, "a new deployment");
    assert_eq!(again.version, 1);
    assert_eq!(
        sys.edge().get(&again.url).send().await.unwrap().status(),
        200
    );
    let events = sys.events().await;
    assert!(
        events.iter().any(
            |e| matches!(&e.payload, Some(Payload::TakenDown(t)) if t.reason == "abuse report")
        )
    );
}

/// Where the deployer is killed (-9 in effect: the failpoint aborts the process) and restarted.
const FAILPOINTS: [&str; 7] = [
    "deployer.enqueue.after_record",
    "deployer.enqueue.after_publish",
    "deployer.job.after_platform_deploy",
    "deployer.job.after_version_saved",
    "deployer.job.after_ready",
    "deployer.job.after_record",
    "deployer.job.after_event",
];

/// For crash tests: the executor (in this process, with its sandboxd) and the deployer's binary,
/// ready to run with a failpoint. Deploy jobs come back 3 s after their holder died (in-progress
/// acks every second); the streams' duplicate windows are a second, so their dedupe hides no
/// second event or count.
async fn crash_setup() -> (Spawned, slipway_test_support::FailpointRun) {
    use slipway_test_support::{FailpointRun, workspace_bin};
    let settings = [
        ("SLIPWAY__SETUP__DEPLOY_ACK_WAIT_SEC", "3"),
        ("SLIPWAY__SETUP__DUPLICATE_WINDOW_SEC", "1"),
        ("SLIPWAY__SETUP__USAGE_DUPLICATE_WINDOW_SEC", "1"),
    ];
    let mut spawn = Spawn::new(Service::Executor).with_sandboxd();
    for (k, v) in settings {
        spawn = spawn.env(k, v);
    }
    let executor = spawn.in_process(slipway_executor::serve).await.unwrap();
    let sd = executor.sandboxd.as_ref().unwrap();
    let mut run = FailpointRun::new(workspace_bin("slipway-deployer").unwrap())
        .timeout(Duration::from_secs(60))
        .env("SLIPWAY__NATS__URL", executor.nats.as_ref().unwrap().url())
        .env("SLIPWAY__HEALTH__LISTEN", "127.0.0.1:0")
        .env("SLIPWAY__EDGE__RESOLVE", sd.edge_addr().to_string());
    for (k, v) in settings {
        run = run.env(k, v);
    }
    (executor, run)
}

// Multi-threaded: the executor runs in this process while the test waits on the deployer's
// process (a blocking wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_each_step_and_restarted_the_deployer_makes_one_version_one_event_one_count() {
    let (executor, run) = crash_setup().await;
    let sd = executor.sandboxd.as_ref().unwrap();
    let sb = create_sandbox(&executor.rpc, "crash:sb", "run_crash").await;
    write_page(&executor.rpc, &sb, "crash:files", "<p>crash</p>").await;
    let short = RpcClient::new(executor.nats_client.clone(), Duration::from_secs(5));
    let deployer_up = || async {
        for _ in 0..200 {
            let probe: Result<ListDeploymentsReply, _> = short
                .call(
                    "slipway.deployer.v1.deployments.list",
                    &ListDeploymentsRequest::default(),
                )
                .await;
            if probe.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the deployer never answered");
    };
    let js = async_nats::jetstream::new(executor.nats_client.clone());
    let sys = EventsReader { js: js.clone() };
    for (n, fp) in FAILPOINTS.iter().enumerate() {
        let mut req = request(&sb, &format!("crash:{n}"));
        req.run_id = "run_crash".into();
        req.name = format!("crash-{n}");
        let armed = run.spawn(Some(fp)).unwrap();
        deployer_up().await;
        // The first try: its reply may be lost to the crash.
        let first = short
            .call::<_, EnqueueDeployReply>("slipway.deployer.v1.deploy", &req)
            .await;
        show_first_try(fp, &first);
        let out = armed.wait(Duration::from_secs(60)).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("failpoint `{fp}` hit")),
            "{fp}: {stderr}"
        );
        // Restarted; the caller retries with the same key.
        let again = run.spawn(None).unwrap();
        deployer_up().await;
        let job: EnqueueDeployReply = short
            .call("slipway.deployer.v1.deploy", &req)
            .await
            .unwrap();
        let done = sys.deployed(&job.job_id).await;
        again.terminate().unwrap();
        let _ = again.wait(Duration::from_secs(30));
        // At the source of truth: one version at sandboxd, one `deployed` event, one count.
        let versions: serde_json::Value = slipway_test_support::http()
            .get(format!(
                "{}/deployments/{}/versions",
                sd.base_url(),
                done.deployment_id
            ))
            .bearer_auth("msk_test")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            versions["data"].as_array().unwrap().len(),
            1,
            "{fp}: versions"
        );
        let events = sys.events().await;
        let announced = events
            .iter()
            .filter(|e| matches!(&e.payload, Some(Payload::Deployed(d)) if d.job_id == job.job_id))
            .count();
        assert_eq!(announced, 1, "{fp}: deployed events");
        let counted = sys
            .usage()
            .await
            .into_iter()
            .filter(|e| e.meter == "deploys" && e.id.starts_with(&done.deployment_id))
            .count();
        assert_eq!(counted, 1, "{fp}: deploys counted");
    }
}

/// Reads the streams directly.
struct EventsReader {
    js: async_nats::jetstream::Context,
}

impl EventsReader {
    async fn all<M: slipway_proto::WireMessage>(&self, stream: &str) -> Vec<M> {
        streams::messages(&self.js, stream).await.unwrap()
    }

    async fn events(&self) -> Vec<RunEvent> {
        self.all("RUN_EVENTS").await
    }

    async fn usage(&self) -> Vec<UsageEvent> {
        self.all("USAGE").await
    }

    async fn deployed(&self, job: &str) -> Deployed {
        for _ in 0..600 {
            for e in self.events().await {
                if let Some(Payload::Deployed(d)) = e.payload
                    && d.job_id == job
                {
                    return d;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("job {job} never deployed");
    }
}

/// What the first try answered (often nothing: the process died first), for a failing run's log.
fn show_first_try<T: std::fmt::Debug, E: std::fmt::Debug>(fp: &str, first: &Result<T, E>) {
    eprintln!("first try at {fp}: {first:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_recording_a_failure_the_deployer_still_says_it_once() {
    let (executor, run) = crash_setup().await;
    let sb = create_sandbox(&executor.rpc, "failed:sb", "run_failed").await;
    let mut req = request(&sb, "failed:1");
    req.run_id = "run_failed".into();
    req.build_command = "echo broken >&2; exit 3".into();
    let short = RpcClient::new(executor.nats_client.clone(), Duration::from_secs(5));
    let fp = "deployer.job.after_failed_record";
    let armed = run.spawn(Some(fp)).unwrap();
    let mut job = None;
    for _ in 0..200 {
        if let Ok(r) = short
            .call::<_, EnqueueDeployReply>("slipway.deployer.v1.deploy", &req)
            .await
        {
            job = Some(r.job_id);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let job = job.expect("the deployer answered");
    let out = armed.wait(Duration::from_secs(60)).unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("failpoint `{fp}` hit")));
    let again = run.spawn(None).unwrap();
    let reader = EventsReader {
        js: async_nats::jetstream::new(executor.nats_client.clone()),
    };
    let mut said = 0;
    for _ in 0..300 {
        said = reader
            .events()
            .await
            .iter()
            .filter(|e| matches!(&e.payload, Some(Payload::DeployFailed(f)) if f.job_id == job))
            .count();
        if said > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Once, with the log, after the restart; and again later only if something repeats it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let failures: Vec<DeployFailed> = reader
        .events()
        .await
        .into_iter()
        .filter_map(|e| match e.payload {
            Some(Payload::DeployFailed(f)) if f.job_id == job => Some(f),
            _ => None,
        })
        .collect();
    assert_eq!((said, failures.len()), (1, 1), "{failures:?}");
    assert!(failures[0].log_tail.contains("broken"));
    again.terminate().unwrap();
    let _ = again.wait(Duration::from_secs(30));
}
