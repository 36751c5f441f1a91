"""Drive a headless Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe): open
a page, type into it like a user, read its DOM, take a screenshot. No websocket client, selenium or
playwright: Chromium reads JSON commands on fd 3 and answers on fd 4, each ended by a NUL byte.

Used by tests/test_serve.py, and to make docs/serve.png from a running `knnd serve`:

    python tools/chromium.py http://127.0.0.1:8000/ --type "red heart" --out docs/serve.png
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", "--mute-audio"]
# the page is ready when it shows neighbour thumbnails and sample images, or an error
PAGE_SETTLED = "['done', 'error'].includes(document.body.dataset.state)"


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Chromium:
    """One headless browser with one page; `with Chromium(path, profile_dir) as browser: ...`."""

    def __init__(self, browser: str, profile: Path, width: int = 1200, height: int = 900, timeout: float = 60):
        self.timeout, self._next_id, self._buffer = timeout, 0, b""
        commands_read, self._commands = os.pipe()
        self._answers, answers_write = os.pipe()
        # above the fds bash redirects to (3, 4), whatever numbers the pipes got (dash takes only 0-9)
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 64) for fd in (commands_read, answers_write)]
        for fd in (commands_read, answers_write):
            os.close(fd)
        Path(profile).mkdir(parents=True, exist_ok=True)
        self.log = open(Path(profile) / "chromium.log", "wb")
        script = f'exec "$0" "$@" 3<&{high[0]} 4>&{high[1]} {high[0]}<&- {high[1]}>&-'
        self.proc = subprocess.Popen(
            ["bash", "-c", script, browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
             f"--window-size={width},{height}", "about:blank"],
            pass_fds=high, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, start_new_session=True)
        for fd in high:
            os.close(fd)
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.page("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, method: str, session: str | None = None, **params) -> dict:
        """Send one DevTools command and wait for its answer (events in between are dropped)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            answer = self._receive(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._answers], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer within {self.timeout} s (log: {self.log.name})")
            chunk = os.read(self._answers, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited (code {self.proc.poll()}; log: {self.log.name})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def page(self, method: str, **params) -> dict:
        return self.call(method, session=self.session, **params)

    def evaluate(self, expression: str):
        """The value of a JS expression in the page (promises awaited)."""
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.page("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && document.URL !== 'about:blank'")

    def wait_for(self, expression: str, timeout: float | None = None, poll: float = 0.1):
        """Poll a JS expression until it is truthy; its value (TimeoutError with the last one)."""
        deadline, value = time.monotonic() + (timeout or self.timeout), None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(poll)
        raise TimeoutError(f"still false after {timeout or self.timeout} s: {expression} (last value {value!r})")

    def type(self, selector: str, text: str) -> None:
        """Focus an element and type text into it, a key event per character."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        for char in text:
            self.page("Input.dispatchKeyEvent", type="keyDown", text=char, key=char, unmodifiedText=char)
            self.page("Input.dispatchKeyEvent", type="keyUp", key=char)

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.page("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                      **({"text": "\r"} if kind == "keyDown" else {}))

    def click(self, selector: str) -> None:
        """A left click in the middle of an element, as a mouse gives it."""
        box = self.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                            f" return {{x: r.x + r.width / 2, y: r.y + r.height / 2}}; }})()")
        for kind in ("mousePressed", "mouseReleased"):
            self.page("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1)

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (beyond the window when it is taller)."""
        data = self.page("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("Browser.close")
            except (RuntimeError, TimeoutError, OSError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for fd in (self._commands, self._answers):
            try:
                os.close(fd)
            except OSError:
                pass
        self.log.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="screenshot a page after typing a prompt into it (knnd serve)")
    parser.add_argument("url")
    parser.add_argument("--type", dest="text", help="text to type into #prompt, then Enter")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the page to settle")
    parser.add_argument("--profile", default="/tmp/knnd-chromium-profile")
    args = parser.parse_args(argv)
    browser = find_chromium()
    if browser is None:
        print("no Chromium: install Debian's chromium package (apt-get install -y chromium)", file=sys.stderr)
        return 2
    with Chromium(browser, Path(args.profile), args.width, args.height) as page:
        page.open(args.url)
        page.wait_for("document.body.dataset.state === 'idle'")
        if args.text:
            page.type("#prompt", args.text)
            page.press_enter()
        page.wait_for(PAGE_SETTLED, timeout=args.timeout, poll=0.5)
        print(f"{page.screenshot(Path(args.out))}: page state {page.evaluate('document.body.dataset.state')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
