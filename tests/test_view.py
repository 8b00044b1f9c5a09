"""``linecam view`` in its own process, driven by headless Chromium (Debian ``chromium`` +
``chromium-driver`` through Selenium) while a simulated line with a tiny VLM runs:
new NG frames show their snapshot and description within 2 s of publication, a stopped
daemon turns offline, and the question box gets answers from the VLM bundle (two turns)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the tiny VLM is built with transformers
pytest.importorskip("selenium")

from bundles import make_tiny_bundle  # noqa: E402
from linecam.broker import free_port  # noqa: E402
from linecam.config import parse_config  # noqa: E402
from linecam.events import subscribe  # noqa: E402
from linecam.runtime.service import run_service  # noqa: E402
from helpers import line_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 2.0


def start_view(broker_port: int, http_port: int, log: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "linecam", "view", "--port", str(broker_port),
                             "--http-port", str(http_port), *extra],
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"), env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"linecam view exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=1)
            return proc
        except urllib.error.HTTPError:  # 401: up, with auth
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"linecam view did not serve: {log.read_text()[-2000:]}")


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    exe, drv = shutil.which("chromium"), shutil.which("chromedriver")
    if not exe or not drv:
        pytest.skip("chromium / chromium-driver not installed (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = exe
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
              "--disable-gpu"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(drv), options=opts)


PAGE_STATE = """
const out = {};
for (const c of document.querySelectorAll('#cards .card')) {
  if (!c.dataset.defect) continue;
  const img = c.querySelector('img.snap');
  out[c.dataset.defect] = {img: !!(img && img.complete && img.naturalWidth > 0),
                           desc: c.querySelector('.desc').textContent};
}
const st = {};
for (const el of document.querySelectorAll('.cam')) st[el.dataset.cam] = el.querySelector('.cam-status').textContent;
return {cards: out, status: st};
"""


@pytest.mark.timeout(300)
def test_page_shows_ng_frames_descriptions_and_offline(broker, tmp_path, vlm_bundle):
    from linecam.station.recorder import Recorder, RecorderSettings
    from linecam.station.store import open_store

    http_port = free_port()
    db = str(tmp_path / "record.db")
    store = open_store(db)  # the page's history table comes from a recorder's database
    rec = Recorder(store, RecorderSettings(port=broker.port, client_id="rec-view", group=None)).start()
    view = start_view(broker.port, http_port, tmp_path / "view.log", "--vlm-bundle", str(vlm_bundle),
                      "--vlm-precision", "fp32", "--db", db, "--title", "linecam test line t")
    driver = None
    try:
        driver = chromium()
        driver.get(f"http://127.0.0.1:{http_port}/")
        time.sleep(1.0)  # the page's event stream is open
        bundle = make_tiny_bundle(tmp_path / "expert", size=64, image_threshold=0.775, pixel_threshold=0.5)
        cfg = line_config(bundle, broker.port, tmp_path, camera={"frames": 40, "fps": 8.0})
        cfg["vlm"] = {"bundle": str(vlm_bundle), "precision": "fp32", "max_new_tokens": 8, "backlog": 64}
        published: dict[str, tuple[str, float]] = {}  # (defect id, what) -> receipt time
        desc_text: dict[str, str] = {}
        status_off: list[float] = []
        seen_img: dict[str, float] = {}
        seen_desc: dict[str, float] = {}
        seen_off: list[float] = []
        done = threading.Event()

        with subscribe("127.0.0.1", broker.port, prefix="linecam/t/c0",
                       types=("defect", "description", "status")) as sub:
            t = threading.Thread(target=lambda: (run_service(parse_config(cfg, tmp_path / "x.yaml")), done.set()),
                                 daemon=True)
            t.start()
            end = None
            while end is None or time.monotonic() < end:
                ev = sub.poll(0.05)
                now = time.monotonic()
                if ev is not None:
                    p = ev.payload
                    if ev.type == "defect" and p.get("snapshot"):
                        published[p["event_id"]] = ("img", now)
                    elif ev.type == "description" and p["status"] == "ok":
                        published[p["defect_event_id"] + "#d"] = ("desc", now)
                        desc_text[p["defect_event_id"]] = p["text"]
                    elif ev.type == "status" and not p["online"] and not ev.retained:
                        status_off.append(now)
                page = driver.execute_script(PAGE_STATE)
                now = time.monotonic()
                for did, c in page["cards"].items():
                    if c["img"]:
                        seen_img.setdefault(did, now)
                    if did in desc_text and c["desc"] == desc_text[did]:
                        seen_desc.setdefault(did, now)
                if page["status"].get("t/c0") == "offline" and status_off:
                    seen_off.append(now)
                if done.is_set() and end is None:
                    end = time.monotonic() + 4.0
                if seen_off:
                    break
        assert published, "the line produced NG frames"
        late = []
        for key, (what, t_pub) in published.items():
            did = key.removesuffix("#d")
            seen = (seen_img if what == "img" else seen_desc).get(did)
            if seen is None or seen - t_pub > DEADLINE_S:
                late.append((what, did, None if seen is None else round(seen - t_pub, 2)))
        n_img = sum(w == "img" for w, _ in published.values())
        n_desc = sum(w == "desc" for w, _ in published.values())
        print(f"\n{n_img} snapshots and {n_desc} descriptions; slowest on the page: "
              f"{max([seen_img[d] - published[d][1] for d in seen_img if d in published] or [0]):.2f} s")
        assert n_img >= 3 and n_desc >= 3
        assert not late, f"not on the page within {DEADLINE_S} s: {late}"
        assert status_off and seen_off and seen_off[0] - status_off[0] <= DEADLINE_S

        # the question box: an answer from the VLM bundle, then a follow-up in the same conversation
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        card = driver.find_element(By.CSS_SELECTOR, "#cards .card[data-defect]")
        for i, q in enumerate(("is this a scratch or a dent?", "how far from the edge?")):
            card.find_element(By.CSS_SELECTOR, "input.question").send_keys(q)
            card.find_element(By.CSS_SELECTOR, "button.ask").click()
            WebDriverWait(driver, 30).until(lambda d: len(card.find_elements(By.CSS_SELECTOR, ".answer .a")) > i
                                            and card.find_elements(By.CSS_SELECTOR, ".answer .a")[i].text != "…")
            answer = card.find_elements(By.CSS_SELECTOR, ".answer .a")[i].text
            assert answer and not answer.startswith("error"), answer
        assert card.get_attribute("data-conversation")
        shot = os.environ.get("LINECAM_VIEW_SCREENSHOT")  # docs/view.png is made this way
        rec.wait_idle(quiet_s=0.5)
        driver.execute_script("return history()")
        time.sleep(0.5)
        rows = driver.find_elements(By.CSS_SELECTOR, "#history tbody tr")
        assert rows and "t/c0" not in rows[0].text and "c0" in rows[0].text
        driver.set_window_size(1280, 1100)
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(shot or str(tmp_path / "view.png"))
    finally:
        if driver is not None:
            driver.quit()
        view.terminate()
        view.wait(10)
        rec.stop()
        store.close()


def test_basic_auth_and_bind(broker, tmp_path):
    http_port = free_port()
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    view = start_view(broker.port, http_port, tmp_path / "view.log", "--user", "op", "--http-password-file",
                      str(pw), "--bind", "127.0.0.1")
    try:
        url = f"http://127.0.0.1:{http_port}/"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url, timeout=5)
        assert e.value.code == 401
        bad = urllib.request.Request(url, headers={"Authorization": "Basic " + base64.b64encode(b"op:x").decode()})
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(bad, timeout=5)
        good = urllib.request.Request(url, headers={"Authorization": "Basic " + base64.b64encode(b"op:s3cret").decode()})
        assert b"linecam" in urllib.request.urlopen(good, timeout=5).read()
        req = urllib.request.Request(url + "api/ask", data=json.dumps({"defect_event_id": "x", "question": "?"}).encode(),
                                     headers={"Authorization": good.headers["Authorization"],
                                              "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:  # no VLM bundle given: the box is off
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 404
    finally:
        view.terminate()
        view.wait(10)


@pytest.mark.timeout(180)
def test_demo_view(tmp_path):
    """``linecam demo --view``: record + view beside the simulated line; the page's history
    (from the record database) holds the run. The demo expert is replaced by a tiny bundle."""
    import signal

    from linecam.demo import _fit_key

    work = tmp_path / "demo"
    make_tiny_bundle(work / "bundle", size=64, image_threshold=0.775, pixel_threshold=0.5)
    (work / "bundle.key").write_text(_fit_key() + "\n")
    http_port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               LINECAM_STATE_DIR=str(tmp_path / "state"))  # the daemon's spool: never in the checkout
    out = tmp_path / "demo.out"
    proc = subprocess.Popen([sys.executable, "-m", "linecam", "demo", "--frames", "20", "--fps", "20", "--workdir",
                             str(work), "--view", "--view-port", str(http_port)],
                            stdout=open(out, "w"), stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while "the page stays at" not in out.read_text():
            assert proc.poll() is None, out.read_text()[-2000:]
            assert time.monotonic() < deadline, out.read_text()[-2000:]
            time.sleep(0.3)
        page = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=5).read().decode()
        assert "linecam demo line" in page
        deadline = time.monotonic() + 20
        while True:
            hist = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/api/history?since=1h",
                                                     timeout=5).read())
            if sum(r["verdicts"] for r in hist["rates"]) == 20 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert sum(r["verdicts"] for r in hist["rates"]) == 20, hist
        assert len(hist["ng"]) == sum(r["ng"] for r in hist["rates"]) > 0
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, out.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
