"""A headless Chromium driven over the DevTools protocol: open a page, run JavaScript, take screenshots.

Used to check the live viewer with a real browser (tests/test_viewer_browser.py, bench/viewer_speed.py).
WebGL runs on SwiftShader (software), so no GPU or display is needed. Install: apt-get install chromium.
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import imageio.v3 as iio
import numpy as np

EXECUTABLES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--use-gl=angle", "--use-angle=swiftshader",
         "--enable-unsafe-swiftshader", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--no-default-browser-check", "--hide-scrollbars", "--mute-audio")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable on PATH, or None."""
    return next((path for path in map(shutil.which, EXECUTABLES) if path), None)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class HeadlessChromium:
    """One headless Chromium process with a fresh profile, stopped by close() (its process group, by PID).

    Use as a context manager::

        with HeadlessChromium(1024, 768) as browser:
            browser.open("http://127.0.0.1:8080")
            image = browser.screenshot()  # [H, W, 3] uint8
    """

    def __init__(self, width: int = 1024, height: int = 768, executable: str | None = None,
                 timeout: float = 60.0):
        executable = executable or find_chromium()
        if executable is None:
            raise FileNotFoundError(f"no Chromium executable on PATH (tried {', '.join(EXECUTABLES)})")
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-profile-")
        self._log = open(Path(self._profile.name) / "chromium.log", "wb")
        port = free_port()
        args = [executable, *FLAGS, f"--user-data-dir={self._profile.name}", f"--remote-debugging-port={port}",
                f"--window-size={width},{height}", "about:blank"]
        # A session of its own: close() ends the browser and its helper processes through this group id.
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self._log, start_new_session=True)
        self._ids = itertools.count(1)
        try:
            self._socket = self._connect(port, timeout)
        except Exception:
            self.close()
            raise

    def _connect(self, port: int, timeout: float):
        from websockets.sync.client import connect

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with code {self.process.returncode}; see its log "
                                   f"{self._log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as reply:
                    pages = [t for t in json.load(reply) if t.get("type") == "page"]
                if pages:
                    return connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout)
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"chromium's DevTools endpoint on port {port} did not answer in {timeout} s")
            time.sleep(0.2)

    def call(self, method: str, timeout: float = 60.0, **params) -> dict:
        """Send one DevTools command and return its result (events received meanwhile are dropped)."""
        call_id = next(self._ids)
        self._socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self._socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def open(self, url: str) -> None:
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def screenshot(self) -> np.ndarray:
        """[H, W, 3] uint8 screenshot of the viewport."""
        data = self.call("Page.captureScreenshot", format="png")["data"]
        return iio.imread(base64.b64decode(data))[..., :3]

    def close(self) -> None:
        """End the browser (SIGTERM to its process group, SIGKILL after 10 s) and remove its profile."""
        socket_ = getattr(self, "_socket", None)
        if socket_ is not None:
            socket_.close()
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.process.wait()
        self._log.close()
        self._profile.cleanup()

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:  # the browser and its helpers have already exited
            pass

    def __enter__(self) -> "HeadlessChromium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
