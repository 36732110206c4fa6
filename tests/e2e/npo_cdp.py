"""A small Chrome DevTools Protocol client for headless Chromium (aiohttp websocket; no extra package).

Only 127.0.0.1 is used: Chromium's DevTools endpoint and the ComfyUI server under test.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = os.environ.get("NPO_E2E_CHROMIUM", "/usr/bin/chromium")

# Flags that work on a closed-network, root, display-less machine (no sandbox as root, no background
# networking so Chromium does not try to reach Google's hosts).
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--mute-audio", "--no-default-browser-check",
    "--disable-dev-shm-usage", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
    "--window-size=1600,1000",
]


class CDPError(RuntimeError):
    pass


class Chromium:
    """Start headless Chromium, find its DevTools port, stop it (and remove its profile) at the end."""

    def __init__(self, executable: str = CHROMIUM, log_path: Path | None = None):
        self.executable = executable
        self.profile = Path(tempfile.mkdtemp(prefix="npo-e2e-chromium-"))
        self.log_path = log_path or (self.profile.parent / f"{self.profile.name}.log")
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self._log = None

    def start(self, timeout: float = 60.0) -> None:
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([self.executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
                                      "about:blank"], stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise CDPError(f"chromium exited with rc {self.proc.returncode}:\n{self.log_tail()}")
            if port_file.is_file():
                text = port_file.read_text().split()
                if text:
                    self.port = int(text[0])
                    return
            time.sleep(0.1)
        raise CDPError(f"chromium did not open a DevTools port within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """One page target: ``evaluate`` JS (promises awaited), collect console errors, take screenshots."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse):
        self.session, self.ws = session, ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self.console: list[str] = []
        self.exceptions: list[str] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, port: int) -> Page:
        session = aiohttp.ClientSession()
        try:
            async with session.put(f"http://127.0.0.1:{port}/json/new?about:blank") as r:
                target = await r.json(content_type=None)
            ws = await session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        except BaseException:
            await session.close()
            raise
        page = cls(session, ws)
        await page.send("Runtime.enable")
        await page.send("Page.enable")
        return page

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
            elif data.get("method") == "Runtime.consoleAPICalled":
                p = data["params"]
                if p.get("type") in ("error", "assert"):
                    self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
            elif data.get("method") == "Runtime.exceptionThrown":
                d = data["params"]["exceptionDetails"]
                self.exceptions.append((d.get("exception") or {}).get("description") or d.get("text", ""))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CDPError("DevTools connection closed"))

    async def send(self, method: str, params: dict | None = None, timeout: float = 60.0) -> dict:
        mid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[mid] = fut
        await self.ws.send_str(json.dumps({"id": mid, "method": method, "params": params or {}}))
        data = await asyncio.wait_for(fut, timeout)
        if "error" in data:
            raise CDPError(f"{method}: {data['error']}")
        return data.get("result", {})

    async def evaluate(self, expression: str, timeout: float = 60.0) -> Any:
        """Run ``expression`` (may be an async IIFE) and return its JSON value; JS exceptions raise."""
        res = await self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                   "returnByValue": True, "timeout": int(timeout * 1000)},
                              timeout=timeout + 5)
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            raise CDPError(f"JS exception: {(d.get('exception') or {}).get('description') or d.get('text')}")
        return res.get("result", {}).get("value")

    async def goto(self, url: str, timeout: float = 60.0) -> None:
        await self.send("Page.navigate", {"url": url}, timeout=timeout)

    async def wait_for(self, expression: str, timeout: float = 60.0, interval: float = 0.25) -> Any:
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            try:
                last = await self.evaluate(expression, timeout=10)
                if last:
                    return last
            except CDPError:
                pass
            await asyncio.sleep(interval)
        raise CDPError(f"timed out after {timeout:.0f} s waiting for: {expression} (last value {last!r})")

    async def screenshot(self, fmt: str = "png", quality: int | None = None) -> bytes:
        params: dict[str, Any] = {"format": fmt}
        if quality is not None:
            params["quality"] = quality
        return base64.b64decode((await self.send("Page.captureScreenshot", params))["data"])

    async def close(self) -> None:
        self._reader.cancel()
        await self.ws.close()
        await self.session.close()
