"""Conformance: previews and shares with MIOSA's official Python SDK (miosa==2.19.2), fetched
through sandboxd's edge as a browser would, without any credential but the link itself."""

import time

from sdk_helpers import preview_app_files, wait_for, watch_in_background


def start_app(client, user):
    sb = client.sandboxes.create(template_id="node", external_user_id=user)
    sb.files.write_many(preview_app_files())
    sb.processes.start("node server.js", name="dev-server")
    return sb


def test_a_preview_token_url_serves_the_app_and_follows_writes_from_inside(client, edge):
    sb = start_app(client, "preview-user")
    token = sb.preview_token(expires_in=600)
    assert token["token"].startswith("mp_")
    assert token["scope"] == "read"
    assert token["expires_at"]
    status, page = edge.wait_ready(token["url"])
    assert status == 200, page
    assert "VERSION_ONE" in page
    assert "data-slipway-live" in page  # the live-refresh script

    events = watch_in_background(sb)
    time.sleep(0.3)
    sb.exec.run("sed -i s/VERSION_ONE/VERSION_TWO/ /workspace/public/index.html")
    wait_for(events, lambda e: e.path == "/workspace/public/index.html")
    status, page = edge.fetch(token["url"])
    assert status == 200
    assert "VERSION_TWO" in page and "VERSION_ONE" not in page
    sb.destroy()


def test_a_preview_share_opens_without_credentials_until_revoked_or_expired(client, edge):
    sb = start_app(client, "share-user")
    preview = sb.previews.create(port=3000, name="web")
    assert preview["port"] == 3000 and preview["state"] == "active"
    assert [p["id"] for p in sb.previews.list()] == [preview["id"]]
    assert sb.previews.get(preview["id"])["name"] == "web"

    share = sb.previews.share(preview["id"], ttl_seconds=600)
    assert share["preview_token"].startswith("miosa_pv_")
    status, page = edge.wait_ready(share["share_url"])
    assert status == 200 and "VERSION_ONE" in page
    sb.previews.revoke_share(preview["id"])
    status, page = edge.fetch(share["share_url"])
    assert status == 403 and "revoked" in page

    short = sb.previews.share(preview["id"], ttl_seconds=1)
    assert edge.fetch(short["share_url"])[0] == 200
    time.sleep(1.2)  # past its expiry
    status, page = edge.fetch(short["share_url"])
    assert status == 401 and "expired" in page

    sb.previews.delete(preview["id"])
    assert sb.previews.list() == []
    sb.destroy()


def test_revoking_one_of_two_sandbox_shares_leaves_the_other_open(client, edge):
    sb = start_app(client, "shares-user")
    shares = [
        sb._transport.request("POST", f"/sandboxes/{sb.id}/shares", json_body={"expires_in": 600, "scope": "read"})
        for _ in range(2)
    ]
    for share in shares:
        assert share["share_id"].startswith("shr_")
        assert "?ms=ms_" in share["share_url"]
        assert edge.wait_ready(share["share_url"])[0] == 200
    sb._transport.request("DELETE", f"/sandboxes/{sb.id}/shares/{shares[0]['share_id']}")
    active = sb._transport.request("GET", f"/sandboxes/{sb.id}/shares")["data"]
    assert [s["share_id"] for s in active] == [shares[1]["share_id"]]
    assert edge.fetch(shares[0]["share_url"])[0] == 403
    assert edge.fetch(shares[1]["share_url"])[0] == 200
    sb.destroy()
