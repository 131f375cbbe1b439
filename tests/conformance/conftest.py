"""A real slipway-sandboxd per test module, on a random loopback port, with a fresh data dir."""

import http.client
import os
import pathlib
import subprocess
import tempfile
import time
import urllib.parse

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def sandboxd_binary() -> str:
    explicit = os.environ.get("SLIPWAY_SANDBOXD_BIN")
    if explicit:
        return explicit
    built = ROOT / "target" / "debug" / "slipway-sandboxd"
    if not built.exists():
        subprocess.run(["cargo", "build", "--quiet", "-p", "slipway-sandboxd"], cwd=ROOT, check=True)
    return str(built)


@pytest.fixture(scope="module")
def sandboxd_process():
    """(API base URL, edge address) of a fresh sandboxd."""
    with tempfile.TemporaryDirectory() as data:
        proc = subprocess.Popen(
            [sandboxd_binary(), "--listen", "127.0.0.1:0", "--edge-listen", "127.0.0.1:0",
             "--data-dir", data],
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
        )
        try:
            base_url = proc.stdout.readline().strip()
            assert base_url.startswith("http://127.0.0.1:"), f"sandboxd printed {base_url!r}"
            edge = proc.stdout.readline().strip()
            assert edge.startswith("edge http://127.0.0.1:"), f"sandboxd printed {edge!r}"
            host, port = edge.removeprefix("edge http://").rsplit(":", 1)
            yield base_url, (host, int(port))
        finally:
            proc.kill()
            proc.wait()
            # Remove the host resources sandboxes keep (cgroups, namespaces, the btrfs mount).
            subprocess.run([sandboxd_binary(), "--data-dir", data, "--purge"], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def sandboxd(sandboxd_process):
    return sandboxd_process[0]


class Edge:
    """Fetches edge URLs the way a browser would: `*.localhost` names go to the edge's loopback
    address (this machine's resolver does not map them), the Host header stays the URL's."""

    def __init__(self, addr):
        self.addr = addr

    def fetch(self, url, method="GET", headers=None, body=None):
        parts = urllib.parse.urlsplit(url)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        conn = http.client.HTTPConnection(*self.addr, timeout=10)
        try:
            conn.request(method, target, body=body, headers={"Host": parts.netloc, **(headers or {})})
            resp = conn.getresponse()
            return resp.status, resp.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def wait_ready(self, url, timeout=15.0):
        """The page, once the app behind it answers (502 while it starts)."""
        deadline = time.monotonic() + timeout
        while True:
            status, body = self.fetch(url)
            if status != 502 or time.monotonic() > deadline:
                return status, body
            time.sleep(0.05)


@pytest.fixture()
def edge(sandboxd_process):
    return Edge(sandboxd_process[1])


@pytest.fixture()
def client(sandboxd):
    from miosa import Miosa

    return Miosa(api_key="msk_test_conformance", base_url=sandboxd)
