"""A minimal driver of headless Chromium through the DevTools protocol over a pipe (no websocket, no
extra package), for tests that click, type and read pages: the documentation site's tests.

Chromium started with ``--remote-debugging-pipe`` reads protocol commands (JSON, each ended by a NUL
byte) from its file descriptor 3 and writes responses and events to its descriptor 4. One
:class:`Browser` holds one Chromium process and one page (tab); every call has a deadline, so a
hanging page fails its test instead of the suite.
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import select
import shutil
import subprocess
import threading
import time
from pathlib import Path

BROWSER_NAMES = (
    "chromium-headless-shell", "chrome-headless-shell", "chromium", "chromium-browser", "google-chrome",
    "google-chrome-stable",
)  # fmt: skip


def find_chromium() -> str | None:
    """``$DIRIO_CHROMIUM``, else the first of :data:`BROWSER_NAMES` on ``PATH``, else ``None``."""
    configured = os.environ.get("DIRIO_CHROMIUM")
    if configured:
        return configured if shutil.which(configured) else None
    return next((found for name in BROWSER_NAMES if (found := shutil.which(name))), None)


#: What the browser answers an evaluation that a navigation of the page interrupted.
NAVIGATION_ERRORS = ("Inspected target navigated or closed", "Cannot find context with specified id",
                     "Execution context was destroyed")


class BrowserError(RuntimeError):
    """A protocol error, or a page that did not answer in time."""


class Browser:
    """One headless Chromium with one page, driven over the DevTools pipe.

    Args:
        binary: the Chromium executable.
        profile: an empty folder for the browser profile.
        width, height: the page's viewport in CSS pixels.
    """

    def __init__(self, binary: str, profile: Path, width: int = 1280, height: int = 900):
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()

        def arrange_descriptors():  # in the child: the pipe ends become descriptors 3 and 4
            os.dup2(to_browser_read, 3)
            os.dup2(from_browser_write, 4)

        command = [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
            f"--user-data-dir={profile}", f"--window-size={width},{height}", "--hide-scrollbars",
            "--no-first-run", "--no-default-browser-check", "about:blank",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, pass_fds=(3, 4), preexec_fn=arrange_descriptors, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        self.session = None
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    # --- the protocol ------------------------------------------------------------------------------

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise BrowserError("Chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise BrowserError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        """Send one command (to the page's session once it exists) and return its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session is not None and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for_event(self, method: str, timeout: float = 30.0) -> dict:
        """The first event ``method`` not seen yet (events seen earlier are kept in :attr:`events`)."""
        for index, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(index)
        deadline = time.monotonic() + timeout
        while True:
            event = self._read_message(deadline)
            if event.get("method") == method:
                return event
            self.events.append(event)

    # --- what a test does --------------------------------------------------------------------------

    def open(self, url: str, timeout: float = 30.0) -> None:
        """Load ``url`` and wait for its load event (images and scripts loaded)."""
        self.events = [e for e in self.events if e.get("method") != "Page.loadEventFired"]
        self.send("Page.navigate", {"url": url})
        self.wait_for_event("Page.loadEventFired", timeout)

    def evaluate(self, expression: str, timeout: float = 30.0):
        """The JSON value of a JavaScript expression in the page (a promise is awaited)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True}, timeout)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]}: {result['exceptionDetails'].get('text')} "
                               f"{result['exceptionDetails'].get('exception', {}).get('description', '')}")
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout: float = 15.0):
        """Evaluate ``expression`` every 50 ms until it is truthy; return its value.

        An evaluation that the page's own navigation interrupts (a click that loads another page)
        counts as not yet true: the browser answers it with an error, not a value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except BrowserError as error:
                if not any(text in str(error) for text in NAVIGATION_ERRORS):
                    raise
                value = None
            if value:
                return value
            time.sleep(0.05)
        raise BrowserError(f"still false after {timeout} s: {expression[:120]}")

    def type_text(self, text: str) -> None:
        """Type ``text`` into the focused element, key by key (input and key events as a person's)."""
        for character in text:
            self.send("Input.dispatchKeyEvent", {"type": "keyDown", "text": character, "key": character})
            self.send("Input.dispatchKeyEvent", {"type": "keyUp", "key": character})

    def console_errors(self) -> list[str]:
        """Errors the page reported since the last call: uncaught exceptions, ``console.error`` and
        ``console.warn`` calls, and failed loads (a missing image or script)."""
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                errors.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
                errors.append(f"console.{params['type']}: " + " ".join(
                    str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"].get("level") in ("error", "warning"):
                entry = params["entry"]
                errors.append(f"log: {entry.get('text')} {entry.get('url', '')}".strip())
        self.events = [e for e in self.events if e.get("method") not in
                       ("Runtime.exceptionThrown", "Runtime.consoleAPICalled", "Log.entryAdded")]
        return errors

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        """Write a PNG of the viewport (or of the whole page) to ``path``."""
        params = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params["clip"] = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        Path(path).write_bytes(base64.b64decode(self.send("Page.captureScreenshot", params)["data"]))
        return Path(path)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (BrowserError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for descriptor in (self._to_browser, self._from_browser):
            try:
                os.close(descriptor)
            except OSError:
                pass

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


class StaticServer:
    """Serve a folder over HTTP on 127.0.0.1 (a free port) in a thread, as a web server would: the
    documentation's search runs in a web worker, which browsers refuse to start from ``file://``."""

    def __init__(self, folder: Path):
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def __enter__(self) -> "StaticServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
