"""The reference side of the executor's wire-conformance test
(`services/executor/tests/it/wire.rs`): the same flow of operations the test drives through the
executor over NATS, here through MIOSA's official Python SDK, against the recording proxy whose
base URL is the first argument. Before each operation, `step` tells the proxy which executor
operation the next requests stand for; each call is the SDK's own, with the same inputs.

Not a pytest module (no `test_` prefix): the Rust test runs it as a program.
"""

import sys
import time
import urllib.request

from miosa import Miosa

USER = "wire-user"


def main(base_url: str) -> None:
    def step(name: str) -> None:
        urllib.request.urlopen(f"{base_url}/__step/{name}").read()

    client = Miosa(api_key="msk_test_wire", base_url=base_url)
    step("templates.list")
    client.sandboxes.list_templates()
    step("sandbox.create")
    sb = client.sandboxes.create(
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
    step("sandbox.get")
    client.sandboxes.get(sb.id)
    step("sandbox.list")
    client.sandboxes.list(external_user_id=USER)
    step("sandbox.readiness")
    sb.readiness()
    step("files.write_many")
    sb.files.write_many(
        [
            {"path": "/workspace/site/index.html", "content": "<p>one</p>"},
            {"path": "/workspace/server.js", "content": b"require('http')"},
        ]
    )
    step("files.read")
    sb.files.read("/workspace/site/index.html")
    step("files.list")
    sb.files.list("/workspace", depth=1)
    step("files.tree")
    sb.files.tree("/workspace", depth=3)
    # MIOSA without the `/fs/*` routes (the proxy answers 404): the SDK's fallbacks.
    odd = "/workspace/a b#c.txt"
    step("legacy.files.write_many")
    sb.files.write_many([{"path": odd, "content": "legacy"}])
    step("legacy.files.read")
    assert sb.files.read(odd) == b"legacy"
    step("exec")
    sb.exec("echo $FOO", {"cwd": "/workspace", "env": {"FOO": "bar"}, "timeout": 30})
    step("process.start")
    pid = sb.processes.start("echo started; sleep 30", env={"B": "two"}, name="sleeper")["pid"]
    step("process.list")
    sb.processes.list()
    step("process.get")
    sb.processes.get(pid)
    step("process.logs")
    sb.processes.logs(pid)
    step("process.stop")
    sb.processes.stop(pid)
    step("snapshot.create")
    snap = sb.create_snapshot(comment="wire")
    step("snapshot.list")
    sb.list_snapshots()
    step("snapshot.restore")
    sb.restore_snapshot(snap["id"])
    step("sandbox.fork")
    fork = sb.fork(
        snapshot_id=snap["id"],
        name="wire-fork",
        external_user_id=USER,
        metadata={"slipway_run_id": "run_wire", "slipway_branch": "b"},
        idempotency_key="wire:fork",
    )
    step("preview.create")
    preview = sb.previews.create(port=3000)
    step("preview.token")
    sb.preview_token(expires_in=600, scope="read")
    step("preview.share")
    sb.previews.share(preview["id"], ttl_seconds=600)
    step("preview.revoke")
    sb.previews.revoke_share(preview["id"])
    step("preview.delete")
    sb.previews.delete(preview["id"])
    step("share.create")
    share = sb.share.create(expires_in=600)
    step("share.list")
    sb.share.list()
    step("share.revoke")
    sb.share.revoke(share["share_id"])
    step("sandbox.update")
    sb.update(always_on=True, timeout_sec=7200, idle_timeout_sec=900, name="wire2",
              metadata={"k": "v"})
    step("usage.sandbox")
    sb.usage()
    step("usage.rollup")
    client.usage.get(group_by="external_user_id", period="custom",
                     start="2026-01-01T00:00:00Z", end="2026-01-02T00:00:00Z")
    step("quota.set")
    client.quotas.set(USER, max_sandboxes=50, max_concurrent=10)
    step("quota.get")
    client.quotas.get(USER)
    step("deploy")
    dep = sb.deploy(name="wire", output_path="/workspace/site",
                    idempotency_key="wire:deploy:1")["deployment_id"]
    step("files.write_many")
    sb.files.write_many([{"path": "/workspace/site/index.html", "content": "<p>two</p>"}])
    step("deploy")
    sb.deploy(deployment_id=dep, output_path="/workspace/site", idempotency_key="wire:deploy:2")
    step("deployment.get")
    client.deployments.get(dep)
    step("version.list")
    v1, v2 = sorted(wait_for_versions(client, dep, 2), key=lambda v: v.version_number)
    step("version.get")
    client.deployments.versions(dep).get(v1.id)
    step("version.logs")
    client.deployments.version_logs(dep, v1.id)
    step("deployment.rollback")
    client.deployments.rollback(dep, version_id=v1.id, idempotency_key="wire:rollback")
    step("deployment.promote")
    client.deployments.versions(dep).promote(v2.id, idempotency_key="wire:promote")
    step("sandbox.pause")
    sb.pause()
    step("sandbox.resume")
    sb.resume(idempotency_key="wire:resume")
    step("sandbox.extend")
    sb.extend(timeout_sec=5400)
    step("sandbox.stop")
    sb.stop()
    step("sandbox.destroy")
    fork.destroy()
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
