"""A real slipway-sandboxd per test module, on a random loopback port, with a fresh data dir."""

import os
import pathlib
import subprocess
import tempfile

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
def sandboxd():
    with tempfile.TemporaryDirectory() as data:
        proc = subprocess.Popen(
            [sandboxd_binary(), "--listen", "127.0.0.1:0", "--data-dir", data],
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
        )
        try:
            base_url = proc.stdout.readline().strip()
            assert base_url.startswith("http://127.0.0.1:"), f"sandboxd printed {base_url!r}"
            yield base_url
        finally:
            proc.kill()
            proc.wait()
            # Remove the host resources sandboxes keep (cgroups, namespaces, the btrfs mount).
            subprocess.run([sandboxd_binary(), "--data-dir", data, "--purge"], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture()
def client(sandboxd):
    from miosa import Miosa

    return Miosa(api_key="msk_test_conformance", base_url=sandboxd)
