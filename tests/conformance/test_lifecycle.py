"""Conformance: the whole lifecycle of MIOSA's "agent builds an app" tutorial with the official
Python SDK (miosa==2.19.2) against sandboxd: create, write many, dev server, preview token, watch
and refresh, snapshot, fork, share and revoke, always_on, usage for the end-user, deploy, destroy
the sandbox, and the deployment still serves. Then versions, rollback, a failed build, quotas."""

import hashlib
import time

import pytest
from miosa.errors import InsufficientCreditsError

from sdk_helpers import preview_app_files, wait_for, watch_in_background


def wait_version(client, deployment_id, version_id, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        version = client.deployments.versions(deployment_id).get(version_id)
        if version.state.value != "building" or time.monotonic() > deadline:
            return version
        time.sleep(0.05)


def one_file_digest(entrypoint, content):
    """sha256 over the manifest's canonical JSON, from the test's own input (docs/sandboxd.md)."""
    data = content.encode()
    manifest = (
        f'{{"entrypoint":"{entrypoint}","files":[{{"path":"{entrypoint}","size":{len(data)},'
        f'"sha256":"{hashlib.sha256(data).hexdigest()}"}}]}}'
    )
    return hashlib.sha256(manifest.encode()).hexdigest()


def test_the_agent_builds_an_app_tutorial_end_to_end(client, edge):
    user = "tutorial-user"
    sb = client.sandboxes.create(template_id="node", external_user_id=user, name="tutorial")
    sb.files.write_many(preview_app_files())
    sb.processes.start("node server.js", name="dev-server")

    token = sb.preview_token(expires_in=600)
    status, page = edge.wait_ready(token["url"])
    assert status == 200 and "VERSION_ONE" in page

    # Feedback becomes a patch; the watch sees it and the preview serves it.
    events = watch_in_background(sb)
    time.sleep(0.3)
    patched = [f for f in preview_app_files() if f["path"].endswith("index.html")][0]
    patched["content"] = patched["content"].replace("VERSION_ONE", "VERSION_TWO")
    sb.files.write_many([patched])
    wait_for(events, lambda e: e.path == "/workspace/public/index.html")
    assert "VERSION_TWO" in edge.fetch(token["url"])[1]

    snap = sb.create_snapshot(comment="after feedback")
    fork = sb.fork(name="experiment")
    assert fork.external_user_id == user
    fork.processes.start("node server.js", name="dev-server")
    status, page = edge.wait_ready(fork.preview_token(expires_in=600)["url"])
    assert status == 200 and "VERSION_TWO" in page

    preview = sb.previews.create(port=3000)
    share = sb.previews.share(preview["id"], ttl_seconds=600)
    assert edge.fetch(share["share_url"])[0] == 200
    sb.previews.revoke_share(preview["id"])
    assert edge.fetch(share["share_url"])[0] == 403

    sb.update(always_on=True)
    assert client.sandboxes.get(sb.id).always_on is True

    usage = client.usage.get(external_user_id=user, period="month-to-date")
    (row,) = usage["results"]
    assert row["external_user_id"] == user
    # Whole seconds in the documented fields (Go's SDK decodes them as integers), exact beside.
    assert isinstance(row["sandbox_seconds"], int) and isinstance(row["computer_seconds"], int)
    assert abs(row["sandbox_seconds"] - row["sandbox_seconds_exact"]) <= 0.5
    assert row["sandbox_seconds_exact"] > 0

    result = sb.deploy(
        name="tutorial-app",
        build_command="mkdir -p dist && cp -r public/. dist/",
        output_path="/workspace/dist",
    )
    assert result["version"]["state"] == "building"
    version = wait_version(client, result["deployment_id"], result["version_id"])
    assert version.state.value == "ready", version
    url = result["url"]
    status, page = edge.fetch(url)
    assert status == 200 and "VERSION_TWO" in page

    fork.destroy()
    sb.destroy()
    assert client.sandboxes.get(sb.id).state == "destroyed"
    status, after = edge.fetch(url)
    assert (status, after) == (200, page)
    deployment = client.deployments.get(result["deployment_id"])
    assert deployment.active_version_id == result["version_id"]
    assert snap["id"]


def test_versions_roll_back_to_the_same_bytes_and_a_failed_build_changes_nothing(client, edge):
    sb = client.sandboxes.create(template_id="node", external_user_id="versions-user")
    sb.files.write("/workspace/site/index.html", "<p>one</p>")
    first = sb.deploy(name="versions", output_path="/workspace/site")
    dep = first["deployment_id"]
    v1 = wait_version(client, dep, first["version_id"])
    assert v1.artifact_sha256 == one_file_digest("index.html", "<p>one</p>")

    sb.files.write("/workspace/site/index.html", "<p>two</p>")
    second = sb.deploy(deployment_id=dep, output_path="/workspace/site")
    v2 = wait_version(client, dep, second["version_id"])
    assert (v2.version_number, v2.state.value) == (2, "ready")
    assert edge.fetch(first["url"]) == (200, "<p>two</p>")

    rolled = client.deployments.rollback(dep)
    assert rolled.active_version_id == v1.id
    assert edge.fetch(first["url"]) == (200, "<p>one</p>")
    assert client.deployments.versions(dep).get(v1.id).artifact_sha256 == v1.artifact_sha256

    failing = sb.deploy(deployment_id=dep, output_path="/workspace/site", build_command="echo boom >&2; exit 3")
    v3 = wait_version(client, dep, failing["version_id"])
    assert v3.state.value == "failed"
    assert "boom" in client.deployments.version_logs(dep, v3.id)
    assert edge.fetch(first["url"]) == (200, "<p>one</p>")
    assert client.deployments.get(dep).active_version_id == v1.id
    sb.destroy()


def test_a_user_at_their_quota_is_refused_on_create_and_fork(client):
    client.quotas.set("quota-capped", max_sandboxes=1)
    sb = client.sandboxes.create(template_id="node", external_user_id="quota-capped")
    with pytest.raises(InsufficientCreditsError) as refused:
        client.sandboxes.create(template_id="node", external_user_id="quota-capped")
    assert "quota_exceeded" in str(refused.value) or "max_sandboxes" in str(refused.value)
    with pytest.raises(InsufficientCreditsError):
        sb.fork()
    other = client.sandboxes.create(template_id="node", external_user_id="quota-free")
    quota = client.quotas.get("quota-capped")
    assert quota["limits"]["max_sandboxes"] == 1
    assert quota["usage"]["total_sandboxes"] == 1
    client.quotas.delete("quota-capped")
    again = client.sandboxes.create(template_id="node", external_user_id="quota-capped")
    for s in (sb, other, again):
        s.destroy()
