"""The HTML reports in a real browser: headless Chromium driven over the DevTools pipe (stdlib only).

Checks, on `sub-XX.html` and `group.html` opened as file:// URLs with the network disabled: no
failed request, no request leaving file:// or data:, no console error or exception, every
image decoded, and the lesion gallery has as many entries as the lesion TSV has rows.
Screenshots go to the test's tmp dir, and a copy to /tmp/report-screens/.

The DevTools protocol is spoken over `--remote-debugging-pipe` (file descriptors 3 and 4,
NUL-separated JSON), so no websocket package or chromedriver is needed.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from test_reports_factory import make_cohort

CHROMIUM = os.environ.get("CMB_CHROMIUM", "/usr/bin/chromium")
SCREENS = Path("/tmp/report-screens")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        shutil.which(CHROMIUM) is None,
        reason=f"Chromium is not installed ({CHROMIUM}); run scripts/install-test-system-deps.sh",
    ),
]


class Browser:
    """A headless Chromium and one page, driven with the DevTools protocol over a pipe."""

    FLAGS = (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--mute-audio",
        "--remote-debugging-pipe",
    )

    def __init__(self, user_data_dir: Path, timeout: float = 30.0):
        self.timeout = timeout
        to_chrome_r, self._to_chrome_w = os.pipe()
        self._from_chrome_r, from_chrome_w = os.pipe()

        def child_fds() -> None:  # move the pipe ends to fds 3 (commands) and 4 (replies)
            a, b = os.dup2(to_chrome_r, 101), os.dup2(from_chrome_w, 102)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *self.FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=child_fds,
            pass_fds=(3, 4),
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self.events: list[dict] = []
        self._cv = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._stderr: list[bytes] = []
        threading.Thread(target=self._drain, daemon=True).start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.call(f"{domain}.enable", session=True)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            session=True,
            width=1280,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self._stderr.append(line)

    def _read(self) -> None:
        buf = b""
        with os.fdopen(self._from_chrome_r, "rb", buffering=0) as fh:
            while True:
                chunk = fh.read(1 << 16)
                if not chunk:
                    break
                buf += chunk
                while b"\0" in buf:
                    raw, buf = buf.split(b"\0", 1)
                    msg = json.loads(raw)
                    with self._cv:
                        if "id" in msg:
                            self._replies[msg["id"]] = msg
                        else:
                            self.events.append(msg)
                        self._cv.notify_all()

    def call(self, method: str, session: bool = False, **params) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        with self._cv:
            while self._next_id not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise TimeoutError(
                        f"{method}: no reply; chromium stderr: {b''.join(self._stderr)[-800:]!r}"
                    )
                self._cv.wait(min(left, 0.5))
            reply = self._replies.pop(self._next_id)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, since: int) -> dict:
        deadline = time.monotonic() + self.timeout
        with self._cv:
            while True:
                for ev in self.events[since:]:
                    if ev.get("method") == method:
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {method} event")
                self._cv.wait(min(left, 0.5))

    def evaluate(self, expression: str):
        result = self.call(
            "Runtime.evaluate",
            session=True,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> list[dict]:
        """Load `url`, force every lazy image to load; return this page's events."""
        start = len(self.events)
        self.call("Page.navigate", session=True, url=url)
        self.wait_event("Page.loadEventFired", start)
        self.evaluate(
            "Promise.all(Array.from(document.images).map(i => { i.loading = 'eager'; "
            "return i.decode().catch(() => null); }))"
        )
        time.sleep(0.3)  # let late events (console, network) arrive
        return self.events[start:]

    def screenshot(self, path: Path) -> Path:
        metrics = self.call("Page.getLayoutMetrics", session=True)
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        height = min(int(size["height"]), 16000)
        shot = self.call(
            "Page.captureScreenshot",
            session=True,
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1},
        )
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome_w)


def problems(events: list[dict]) -> list[str]:
    """Failed or external requests, console errors and exceptions among a page's events."""
    out = []
    for ev in events:
        method, params = ev.get("method"), ev.get("params", {})
        if method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if not url.startswith(("file:", "data:")):
                out.append(f"request leaving the page's files: {url}")
        elif method == "Network.loadingFailed":
            out.append(f"failed request: {params.get('errorText')} ({params.get('requestId')})")
        elif method == "Network.responseReceived":
            status = params["response"].get("status", 0)
            if status >= 400:
                out.append(f"HTTP {status}: {params['response']['url']}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            out.append(f"console error: {params.get('args')}")
        elif method == "Runtime.exceptionThrown":
            out.append(f"exception: {params['exceptionDetails'].get('text')}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            out.append(f"log error: {params['entry'].get('text')} {params['entry'].get('url', '')}")
    return out


GALLERY_JS = """
(() => {
  const sections = Array.from(document.querySelectorAll('section.image'));
  return sections.map(s => ({
    id: s.id,
    status: s.dataset.status,
    entries: s.querySelectorAll('table.lesions tr.gallery-entry').length,
    cropsLoaded: Array.from(s.querySelectorAll('table.lesions tr.gallery-entry img'))
      .filter(i => i.complete && i.naturalWidth > 0).length,
    rejected: s.querySelectorAll('tr.rejected-entry').length,
  }));
})()
"""
IMAGES_JS = (
    "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
    ".map(i => i.getAttribute('src').slice(0, 80))"
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("browser-cohort"))


def _save(browser: Browser, tmp_path: Path, name: str) -> Path:
    shot = browser.screenshot(tmp_path / name)
    SCREENS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, SCREENS / name)
    return shot


def test_subject_report_in_browser(browser, cohort, tmp_path):
    out = cohort["output_dir"]
    for subject, images in cohort["images"].items():
        page = out / f"{subject}.html"
        events = browser.open(page.as_uri())
        assert problems(events) == [], page
        assert browser.evaluate(IMAGES_JS) == [], "images that did not load"
        sections = {s["id"]: s for s in browser.evaluate(GALLERY_JS)}
        assert len(sections) == len(images)
        for info in images:
            section = next(s for k, s in sections.items() if k.startswith(info["source"]))
            assert section["status"] == info["status"]
            if info["lesions_tsv"] is not None:
                n_rows = len(pd.read_csv(info["lesions_tsv"], sep="\t"))
                assert n_rows == info["n_lesions"]
                assert section["entries"] == n_rows
                assert section["cropsLoaded"] == n_rows
            assert section["rejected"] == info["n_rejected_shown"]
        shot = _save(browser, tmp_path, f"{subject}.png")
        assert shot.stat().st_size > 10_000


def test_failed_image_is_explained_in_browser(browser, cohort):
    page = cohort["output_dir"] / "sub-01.html"
    browser.open(page.as_uri())
    text = browser.evaluate("document.querySelector('section[data-status=failed]').innerText")
    assert "This image failed" in text
    assert cohort["failure_message"] in text
    assert "What to do" in text


def test_group_report_in_browser(browser, cohort, tmp_path):
    page = cohort["output_dir"] / "group.html"
    events = browser.open(page.as_uri())
    assert problems(events) == []
    assert browser.evaluate(IMAGES_JS) == []
    rows = browser.evaluate("document.querySelectorAll('#cohort tbody tr').length")
    assert rows == cohort["n_images"]
    links = browser.evaluate(
        "Array.from(document.querySelectorAll('#cohort tbody a')).map(a => a.href)"
    )
    for link in links:  # every link points at an existing subject report
        assert Path(link.split("#")[0].removeprefix("file://")).exists(), link
    # sorting by total, descending (two clicks), puts the largest count first
    header = (
        "Array.from(document.querySelectorAll('#cohort th')).find(t => t.textContent === 'total')"
    )
    browser.evaluate(f"{header}.click(); {header}.click(); null")
    first = browser.evaluate(
        "document.querySelector('#cohort tbody tr').cells[5].textContent"
    )  # fmt: skip
    assert float(first) == max(cohort["totals"])
    assert problems(browser.events[-50:]) == []
    _save(browser, tmp_path, "group.png")
