//! Who may call each operation: beside the subject map, the one table the generated NATS
//! authorization follows. A service may call only the operations listed for it (preview only
//! the executor operations it uses), the platform only the public ones, and admin-only
//! operations (billing's `period.close` and `reconcile`) nobody else.

use crate::auth::Principal;
use crate::subjects::Service;

/// One operation (`slipway.<service>.v1.<op>`) and who may call it (admin may call every one).
#[derive(Clone, Copy, Debug)]
pub struct Operation {
    pub service: Service,
    pub op: &'static str,
    pub callers: &'static [Principal],
}

use Principal::{Platform, Service as S};
use Service::{Billing, Deployer, Executor, Planner, Preview};

const fn op(service: Service, op: &'static str, callers: &'static [Principal]) -> Operation {
    Operation {
        service,
        op,
        callers,
    }
}

const PLANNER: &[Principal] = &[S(Planner)];
const PLANNER_DEPLOYER: &[Principal] = &[S(Planner), S(Deployer)];
const DEPLOYER: &[Principal] = &[S(Deployer)];
const PREVIEW: &[Principal] = &[S(Preview)];
const BILLING: &[Principal] = &[S(Billing)];
const PUBLIC: &[Principal] = &[Platform];
const PUBLIC_AND_PLANNER: &[Principal] = &[Platform, S(Planner)];
const ADMIN_ONLY: &[Principal] = &[];

/// Every operation of every service, with its callers.
pub const OPERATIONS: &[Operation] = &[
    // The executor: the only door to the sandbox platform.
    op(Executor, "sandbox.create", PLANNER),
    op(
        Executor,
        "sandbox.get",
        &[S(Planner), S(Preview), S(Deployer)],
    ),
    op(Executor, "sandbox.list", PLANNER),
    op(Executor, "sandbox.update", PLANNER),
    op(Executor, "sandbox.pause", PLANNER),
    op(Executor, "sandbox.resume", PLANNER),
    op(Executor, "sandbox.stop", PLANNER),
    op(Executor, "sandbox.extend", PLANNER),
    op(Executor, "sandbox.readiness", PLANNER),
    op(Executor, "sandbox.destroy", PLANNER_DEPLOYER),
    op(Executor, "sandbox.fork", PLANNER),
    op(Executor, "templates.list", PLANNER),
    op(Executor, "files.write_many", PLANNER),
    op(Executor, "files.read", PLANNER),
    op(Executor, "files.list", PLANNER),
    op(Executor, "files.tree", PLANNER),
    op(Executor, "files.delete", PLANNER),
    op(Executor, "exec", PLANNER),
    op(Executor, "process.start", PLANNER),
    op(Executor, "process.list", PLANNER),
    op(Executor, "process.get", PLANNER),
    op(Executor, "process.stop", PLANNER),
    op(Executor, "process.logs", PLANNER),
    op(Executor, "snapshot.create", PLANNER),
    op(Executor, "snapshot.list", PLANNER),
    op(Executor, "snapshot.restore", PLANNER),
    op(Executor, "preview.create", PREVIEW),
    op(Executor, "preview.token", PREVIEW),
    op(Executor, "preview.share", PREVIEW),
    op(Executor, "preview.revoke", PREVIEW),
    op(Executor, "preview.delete", PREVIEW),
    op(Executor, "share.create", PREVIEW),
    op(Executor, "share.list", PREVIEW),
    op(Executor, "share.revoke", PREVIEW),
    op(Executor, "relay.start", PREVIEW),
    op(Executor, "relay.stop", PREVIEW),
    op(Executor, "deploy", DEPLOYER),
    op(Executor, "deployment.get", DEPLOYER),
    op(Executor, "deployment.rollback", DEPLOYER),
    op(Executor, "deployment.promote", DEPLOYER),
    op(Executor, "deployment.delete", DEPLOYER),
    op(Executor, "version.get", DEPLOYER),
    op(Executor, "version.list", DEPLOYER),
    op(Executor, "version.logs", DEPLOYER),
    op(Executor, "usage.sandbox", PLANNER),
    op(Executor, "usage.rollup", BILLING),
    op(Executor, "quota.get", BILLING),
    op(Executor, "quota.set", BILLING),
    op(Executor, "reap", PLANNER),
    // The planner's queries.
    op(Planner, "runs.list", PUBLIC),
    op(Planner, "run.get", PUBLIC),
    // Preview.
    op(Preview, "open", PLANNER),
    op(Preview, "token", PUBLIC_AND_PLANNER),
    op(Preview, "share.create", PLANNER),
    op(Preview, "share.revoke", PLANNER),
    op(Preview, "share.list", PUBLIC_AND_PLANNER),
    op(Preview, "ticket", PUBLIC),
    op(Preview, "close", PLANNER),
    // Billing.
    op(Billing, "usage.get", PUBLIC_AND_PLANNER),
    op(Billing, "usage.rollup", PUBLIC),
    op(Billing, "invoice.export", PUBLIC),
    op(Billing, "quota.get", PUBLIC_AND_PLANNER),
    op(Billing, "quota.set", PUBLIC),
    op(Billing, "quota.reserve", PLANNER),
    op(Billing, "quota.release", PLANNER),
    op(Billing, "reconcile", ADMIN_ONLY),
    op(Billing, "period.close", ADMIN_ONLY),
    // The deployer.
    op(Deployer, "deploy", PLANNER),
    op(Deployer, "deployments.list", PUBLIC_AND_PLANNER),
    op(Deployer, "deployment.get", PUBLIC_AND_PLANNER),
    op(Deployer, "rollback", PLANNER),
    op(Deployer, "promote", PLANNER),
    op(Deployer, "deployment.delete", ADMIN_ONLY),
];

/// The operations `principal` may call (admin: every one).
pub fn callable_by(principal: Principal) -> impl Iterator<Item = &'static Operation> {
    OPERATIONS
        .iter()
        .filter(move |o| principal == Principal::Admin || o.callers.contains(&principal))
}

/// Whether `principal` may call `op` of `service`.
pub fn may_call(principal: Principal, service: Service, op: &str) -> bool {
    callable_by(principal).any(|o| o.service == service && o.op == op)
}

/// The operations of `service` (what it registers), in table order.
pub fn of(service: Service) -> impl Iterator<Item = &'static Operation> {
    OPERATIONS.iter().filter(move |o| o.service == service)
}

impl Operation {
    /// `slipway.<service>.v1.<op>`
    pub fn subject(&self) -> String {
        self.service.op(self.op)
    }
}
