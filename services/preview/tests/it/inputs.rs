//! Every input that can be wrong is refused with an error naming it, and nothing else is lost:
//! the run's preview keeps working after each refusal.

use slipway_common::Service;
use slipway_proto::v1::*;

use crate::{System, code, message};

/// The field an error names (`details.field`).
fn field(e: &slipway_common::RpcError) -> String {
    e.service_error()
        .and_then(|s| s.details.get("field").cloned())
        .unwrap_or_default()
}

fn open(run: &str, branch: &str, port: u32, sandbox: &str) -> OpenPreviewRequest {
    OpenPreviewRequest {
        run_id: run.into(),
        branch: branch.into(),
        port,
        sandbox_id: sandbox.into(),
    }
}

#[tokio::test]
async fn bad_inputs_are_refused_with_the_field_named_and_nothing_else_is_lost() {
    let sys = System::start(1, &[]).await;
    let sb = sys.app("run_in", "main").await;
    let other = sys.app("run_other", "main").await;
    let good = sys.open("run_in", "main", &sb).await;

    let refused = |r: Result<OpenPreviewReply, slipway_common::RpcError>| r.unwrap_err();
    let cases: Vec<(OpenPreviewRequest, ErrorCode, &str)> = vec![
        (
            open("run_in", "main", 0, &sb),
            ErrorCode::InvalidInput,
            "port",
        ),
        (
            open("run_in", "main", 70_000, &sb),
            ErrorCode::InvalidInput,
            "port",
        ),
        (
            open("", "main", 3000, &sb),
            ErrorCode::InvalidInput,
            "run_id",
        ),
        (
            open("run.in", "main", 3000, &sb),
            ErrorCode::InvalidInput,
            "run_id",
        ),
        (
            open("run_in", "Main!", 3000, &sb),
            ErrorCode::InvalidInput,
            "branch",
        ),
        (
            open("run_in", "main", 3000, "../etc"),
            ErrorCode::InvalidInput,
            "sandbox_id",
        ),
        (
            open("run_in", "main", 3000, "sbx_missing"),
            ErrorCode::NotFound,
            "sandbox_id",
        ),
        // Another tenant's sandbox, named by its id.
        (
            open("run_in", "main", 3001, &other),
            ErrorCode::InvalidInput,
            "sandbox_id",
        ),
        // The run's own sandbox under another branch.
        (
            open("run_in", "feature", 3000, &sb),
            ErrorCode::InvalidInput,
            "sandbox_id",
        ),
    ];
    for (req, want, named) in cases {
        let e = refused(sys.call("open", &req).await);
        assert_eq!(code(&e), want, "{req:?}: {}", message(&e));
        assert_eq!(field(&e), named, "{req:?}: {}", message(&e));
    }

    // Tokens: a malformed id, an unknown one.
    for (id, want) in [
        ("nope", ErrorCode::InvalidInput),
        ("pv_0123456789abcdef0123456789abcdef", ErrorCode::NotFound),
    ] {
        let e = sys
            .call::<_, PreviewTokenRefreshReply>(
                "token",
                &PreviewTokenRefreshRequest {
                    preview_id: id.into(),
                },
            )
            .await
            .unwrap_err();
        assert_eq!(code(&e), want, "{id}: {}", message(&e));
        assert_eq!(field(&e), "preview_id");
    }

    // Share links: over the cap, no key, a run without previews, a branch without one.
    let share = |run: &str, branch: &str, ttl: u64, key: &str| CreateShareLinkRequest {
        run_id: run.into(),
        branch: branch.into(),
        ttl_sec: ttl,
        idempotency_key: key.into(),
    };
    for (req, want, named) in [
        (
            share("run_in", "main", 7 * 86_400 + 1, "k1"),
            ErrorCode::InvalidInput,
            "ttl_sec",
        ),
        (
            share("run_in", "main", 60, ""),
            ErrorCode::InvalidInput,
            "idempotency_key",
        ),
        (
            share("run_unknown", "main", 60, "k2"),
            ErrorCode::NotFound,
            "run_id",
        ),
        (
            share("run_in", "feature", 60, "k3"),
            ErrorCode::FailedPrecondition,
            "branch",
        ),
    ] {
        let e = sys
            .call::<_, ShareLinkReply>("share.create", &req)
            .await
            .unwrap_err();
        assert_eq!(code(&e), want, "{req:?}: {}", message(&e));
        assert_eq!(field(&e), named, "{req:?}: {}", message(&e));
    }
    // A key reused for another link.
    sys.share("run_in", "reused", 60).await;
    let e = sys
        .call::<_, ShareLinkReply>("share.create", &share("run_in", "main", 120, "reused"))
        .await
        .unwrap_err();
    assert_eq!(code(&e), ErrorCode::InvalidInput);
    assert_eq!(field(&e), "idempotency_key");

    // Revoking: a malformed id, an unknown one, another run's link.
    let theirs = {
        let sb2 = sys.app("run_theirs", "main").await;
        sys.open("run_theirs", "main", &sb2).await;
        sys.share("run_theirs", "theirs", 600).await
    };
    for (run, id, want) in [
        ("run_in", "sh_bad", ErrorCode::InvalidInput),
        (
            "run_in",
            "sh_0123456789abcdef0123456789abcdef",
            ErrorCode::NotFound,
        ),
        ("run_in", theirs.share_id.as_str(), ErrorCode::NotFound),
    ] {
        let e = sys
            .call::<_, RevokeShareLinkReply>(
                "share.revoke",
                &RevokeShareLinkRequest {
                    run_id: run.into(),
                    share_id: id.into(),
                },
            )
            .await
            .unwrap_err();
        assert_eq!(code(&e), want, "{id}: {}", message(&e));
        assert_eq!(field(&e), "share_id");
    }
    assert_eq!(sys.status(&theirs.url).await.0, 200, "their link untouched");

    // Tickets for a run nobody knows.
    let e = sys
        .call::<_, IssueTicketReply>(
            "ticket",
            &IssueTicketRequest {
                run_id: "run_nobody".into(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), ErrorCode::NotFound);
    assert_eq!(field(&e), "run_id");

    // A body that is no message at all: an error reply, not a crash.
    let raw = sys
        .rpc()
        .nats()
        .request(Service::Preview.op("open"), "{not json".into())
        .await
        .unwrap();
    let status = raw.headers.unwrap();
    assert_eq!(
        status.get("Nats-Service-Error-Code").unwrap().as_str(),
        "400"
    );

    // After all that, the preview still works.
    assert_eq!(sys.status(&good.url).await.0, 200);
    let fresh: PreviewTokenRefreshReply = sys
        .call(
            "token",
            &PreviewTokenRefreshRequest {
                preview_id: good.preview_id,
            },
        )
        .await
        .unwrap();
    assert_eq!(sys.status(&fresh.url).await.0, 200);
}
