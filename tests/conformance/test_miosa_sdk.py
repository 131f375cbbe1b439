"""Conformance: MIOSA's official Python SDK (miosa==2.19.2) against sandboxd.

The calls are the ones the app lifecycle makes, in the order MIOSA's "agent builds an app"
tutorial makes them.
"""

import time

import pytest
from miosa.errors import MiosaError, NotFoundError, PermissionError as MiosaPermissionError

from sdk_helpers import wait_for, watch_in_background

SERVER_JS = (
    "require('http').createServer((q, s) => s.end('hello from the dev server'))"
    ".listen(3000, () => console.log('ready on 3000'))"
)


def test_the_app_lifecycle_with_the_official_sdk(client):
    sb = client.sandboxes.create(template_id="node", external_user_id="end-user@example.com", name="conformance")
    assert sb.id.startswith("sbx_")
    assert sb.state == "running"
    assert sb.external_user_id == "end-user@example.com"
    assert sb.wait_until_ready(timeout=10)
    assert client.sandboxes.get(sb.id).template_id == "node"
    assert client.sandboxes.get_by_name("conformance").id == sb.id
    listed = client.sandboxes.list(external_user_id="end-user@example.com")
    assert [s.id for s in listed] == [sb.id]

    result = sb.files.write_many(
        [
            {"path": "/workspace/server.js", "content": SERVER_JS},
            {"path": "/workspace/public/index.html", "content": b"<h1>hi</h1>"},
        ]
    )
    # MIOSA's documented shape: {path, size_bytes} per file.
    assert sorted(result["written"], key=lambda w: w["path"]) == [
        {"path": "/workspace/public/index.html", "size_bytes": len(b"<h1>hi</h1>")},
        {"path": "/workspace/server.js", "size_bytes": len(SERVER_JS.encode())},
    ]
    assert sb.files.read_text("/workspace/public/index.html") == "<h1>hi</h1>"
    sb.files.write("/workspace/notes.txt", "single write")
    assert sb.files.read("/workspace/notes.txt") == b"single write"
    assert sb.files.stat("/workspace/server.js")["size"] == len(SERVER_JS)
    tree = sb.files.tree("/workspace", depth=2)
    assert {c["name"] for c in tree["children"]} >= {"server.js", "public", "notes.txt"}

    proc = sb.processes.start("node server.js", name="dev-server")
    pid = proc["pid"]
    deadline = time.monotonic() + 15
    body = ""
    while time.monotonic() < deadline and "hello" not in body:
        res = sb.exec.run(
            "node -e \"fetch('http://127.0.0.1:3000/').then(r => r.text()).then(t => console.log(t)).catch(() => {})\""
        )
        body = res.stdout
        time.sleep(0.1)
    assert body.strip() == "hello from the dev server"
    assert res.exit_code == 0
    assert any(p["pid"] == pid for p in sb.processes.list())
    assert "ready on 3000" in sb.processes.logs(pid)

    events = watch_in_background(sb)
    time.sleep(0.3)
    sb.exec.run("echo 'written by a process inside' > /workspace/from-exec.txt")
    event = wait_for(events, lambda e: e.path == "/workspace/from-exec.txt")
    assert event.event in ("created", "modified")
    assert sb.files.read_text("/workspace/from-exec.txt") == "written by a process inside\n"

    sb.update(always_on=True)
    assert sb.always_on is True
    assert client.sandboxes.get(sb.id).always_on is True

    failed = sb.exec.run("echo oops >&2; exit 4")
    assert (failed.exit_code, failed.stderr) == (4, "oops\n")

    sb.processes.stop(pid)
    sb.destroy()
    assert sb.state == "destroyed"
    assert client.sandboxes.get(sb.id).state == "destroyed"
    assert client.sandboxes.list(external_user_id="end-user@example.com") == []


def test_refusals_reach_the_sdk_as_its_own_errors(client):
    with pytest.raises(NotFoundError):
        client.sandboxes.get("sbx_does_not_exist")
    sb = client.sandboxes.create(template_id="python")
    with pytest.raises(MiosaPermissionError) as escaped:
        sb.files.write("/etc/passwd", "nope")
    assert escaped.value.status_code == 403
    with pytest.raises(MiosaPermissionError):
        sb.files.write_many([{"path": "ok.txt", "content": "1"}, {"path": "../escape.txt", "content": "2"}])
    with pytest.raises(NotFoundError):
        sb.files.read("/workspace/ok.txt")
    sb.destroy()


def test_a_retried_create_with_the_same_key_is_one_sandbox(client):
    first = client.sandboxes.create(template_id="static", idempotency_key="conformance-key-1")
    again = client.sandboxes.create(template_id="static", idempotency_key="conformance-key-1")
    assert first.id == again.id
    assert len([s for s in client.sandboxes.list() if s.id == first.id]) == 1
    first.destroy()


def test_snapshot_fork_restore_and_usage(client):
    sb = client.sandboxes.create(template_id="node", external_user_id="brancher")
    sb.files.write("/workspace/app.txt", "v1")
    snap = sb.create_snapshot("baseline")
    assert snap["comment"] == "baseline"
    assert [s["id"] for s in sb.list_snapshots()] == [snap["id"]]

    sb.files.write("/workspace/app.txt", "v2")
    fork = sb.fork(name="branch-b")
    assert fork.id != sb.id
    assert fork.external_user_id == "brancher"
    assert fork.files.read_text("/workspace/app.txt") == "v2"
    fork.files.write("/workspace/app.txt", "fork")
    sb.files.write("/workspace/parent-only.txt", "p")
    assert sb.files.read_text("/workspace/app.txt") == "v2"
    with pytest.raises(NotFoundError):
        fork.files.read("/workspace/parent-only.txt")

    from_snapshot = sb.fork(snapshot_id=snap["id"])
    assert from_snapshot.files.read_text("/workspace/app.txt") == "v1"

    restored = sb.restore_snapshot(snap["id"])
    assert restored.id == sb.id
    assert sb.files.read_text("/workspace/app.txt") == "v1"
    assert fork.files.read_text("/workspace/app.txt") == "fork"

    sb.exec.run("timeout 1 sh -c 'while :; do :; done'")
    usage = sb.usage()
    assert usage["sandbox_id"] == sb.id
    assert usage["exec_count"] >= 1
    assert usage["active_cpu_ms"] > 0
    assert usage["provisioned_vcpu_ms"] > 0
    # The documented types: whole numbers, nullable network counters, and the three documented
    # measurement keys.
    for key in ("runtime_sec", "provisioned_vcpu_ms", "provisioned_memory_mb_ms", "creation_count",
                "active_cpu_ms", "estimated_cost_cents"):
        assert isinstance(usage[key], int), (key, usage[key])
    assert usage["network_egress_bytes"] is None and usage["network_ingress_bytes"] is None
    assert set(usage["measurement_status"]) == {"active_cpu", "network", "provisioned_resources"}
    assert usage["measurement_status"]["network"] == "not_measured"
    for s in (from_snapshot, fork, sb):
        s.destroy()
    assert client.sandboxes.get(sb.id).state == "destroyed"
    assert sb.usage()["runtime_sec"] >= 0
