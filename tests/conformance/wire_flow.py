"""The reference side of the executor's wire-conformance test
(`services/executor/tests/it/wire.rs`): the same flow of operations the test drives through the
executor over NATS, here through MIOSA's official Python SDK, against the recording proxy whose
base URL is the first argument. Each step is the SDK's own call for the executor operation named
beside it; the proxy records what goes over the wire, the Rust test compares the two records.

Not a pytest module (no `test_` prefix): the Rust test runs it as a program.
"""

import sys
import time

from miosa import Miosa

USER = "wire-user"


def main(base_url: str) -> None:
    client = Miosa(api_key="msk_test_wire", base_url=base_url)
    client.sandboxes.list_templates()  # templates.list
    sb = client.sandboxes.create(  # sandbox.create
        template_id="node",
        external_user_id=USER,
        external_project_id="wire-project",
        external_workspace_id="wire-workspace",
        name="wire",
        env={"A": "one"},
        metadata={"slipway_run_id": "run_wire"},
        timeout_sec=3600,
        idle_timeout_sec=600,
        persistent=False,
        always_on=False,
        idempotency_key="wire:create",
    )
    client.sandboxes.get(sb.id)  # sandbox.get
    client.sandboxes.list(external_user_id=USER)  # sandbox.list
    sb.readiness()  # sandbox.readiness
    sb.files.write_many(  # files.write_many
        [
            {"path": "/workspace/site/index.html", "content": "<p>one</p>"},
            {"path": "/workspace/server.js", "content": b"require('http')"},
        ]
    )
    sb.files.read("/workspace/site/index.html")  # files.read
    sb.files.list("/workspace", depth=1)  # files.list
    sb.files.tree("/workspace", depth=3)  # files.tree
    sb.exec("echo $FOO", {"cwd": "/workspace", "env": {"FOO": "bar"}, "timeout": 30})  # exec
    proc = sb.processes.start("echo started; sleep 30", env={"B": "two"}, name="sleeper")
    pid = proc["pid"]  # process.start
    sb.processes.list()  # process.list
    sb.processes.get(pid)  # process.get
    sb.processes.logs(pid)  # process.logs
    sb.processes.stop(pid)  # process.stop
    snap = sb.create_snapshot(comment="wire")  # snapshot.create
    sb.list_snapshots()  # snapshot.list
    sb.restore_snapshot(snap["id"])  # snapshot.restore
    fork = sb.fork(snapshot_id=snap["id"], idempotency_key="wire:fork")  # sandbox.fork
    fork.update(name="wire-fork", metadata={"slipway_branch": "b"})  # the fork's tag
    preview = sb.previews.create(port=3000)  # preview.create
    sb.preview_token(expires_in=600, scope="read")  # preview.token
    sb.previews.share(preview["id"], ttl_seconds=600)  # preview.share
    sb.previews.revoke_share(preview["id"])  # preview.revoke
    share = sb.share.create(expires_in=600)  # share.create
    sb.share.list()  # share.list
    sb.share.revoke(share["share_id"])  # share.revoke
    sb.update(always_on=True, timeout_sec=7200, idle_timeout_sec=900, name="wire2",
              metadata={"k": "v"})  # sandbox.update
    sb.usage()  # usage.sandbox
    client.usage.get(group_by="external_user_id", period="custom",  # usage.rollup
                     start="2026-01-01T00:00:00Z", end="2026-01-02T00:00:00Z")
    client.quotas.set(USER, max_sandboxes=50, max_concurrent=10)  # quota.set
    client.quotas.get(USER)  # quota.get
    first = sb.deploy(name="wire", output_path="/workspace/site",
                      idempotency_key="wire:deploy:1")  # deploy
    dep = first["deployment_id"]
    sb.files.write_many([{"path": "/workspace/site/index.html", "content": "<p>two</p>"}])
    sb.deploy(deployment_id=dep, output_path="/workspace/site", idempotency_key="wire:deploy:2")
    client.deployments.get(dep)  # deployment.get
    versions = wait_for_versions(client, dep, 2)  # version.list
    v1, v2 = sorted(versions, key=lambda v: v.version_number)
    client.deployments.versions(dep).get(v1.id)  # version.get
    client.deployments.version_logs(dep, v1.id)  # version.logs
    client.deployments.rollback(dep, version_id=v1.id, idempotency_key="wire:rollback")
    client.deployments.versions(dep).promote(v2.id, idempotency_key="wire:promote")
    sb.pause()  # sandbox.pause
    sb.resume(idempotency_key="wire:resume")  # sandbox.resume
    sb.extend(timeout_sec=5400)  # sandbox.extend
    sb.stop()  # sandbox.stop
    fork.destroy()  # sandbox.destroy
    sb.destroy()


def wait_for_versions(client, dep, count):
    deadline = time.monotonic() + 30
    while True:
        versions = client.deployments.versions(dep).list()
        if len(versions) >= count and all(v.state in ("ready", "failed") for v in versions):
            return versions
        if time.monotonic() > deadline:
            raise AssertionError(f"versions never settled: {versions}")
        time.sleep(0.1)


if __name__ == "__main__":
    main(sys.argv[1])
