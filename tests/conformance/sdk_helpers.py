"""Helpers the SDK conformance tests share."""

import pathlib
import queue
import threading
import time

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"


def watch_in_background(sb, path="/workspace"):
    events: "queue.Queue" = queue.Queue()

    def run():
        try:
            for event in sb.files.watch(path):
                events.put(event)
        except Exception as exc:  # the stream ends when the sandbox is destroyed
            events.put(exc)

    threading.Thread(target=run, daemon=True).start()
    return events


def wait_for(events, predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            event = events.get(timeout=0.2)
        except queue.Empty:
            continue
        seen.append(event)
        if not isinstance(event, Exception) and predicate(event):
            return event
    raise AssertionError(f"no matching watch event; saw {seen}")


def preview_app_files():
    """The fixture dev server (tests/fixtures/preview-app) as write_many entries."""
    app = FIXTURES / "preview-app"
    return [
        {"path": "/workspace/server.js", "content": (app / "server.js").read_text()},
        {"path": "/workspace/app.js", "content": (app / "app.js").read_text()},
        {"path": "/workspace/public/index.html", "content": (app / "index.html").read_text()},
    ]
