"""The web dashboard in a real browser (Debian's chromium driven by Playwright) against a real server: uvicorn
on a free port with the session's PostgreSQL, Redis and Celery worker. Every test fails on a console error
or on a request to any other host. DIVMERGE_DASHBOARD_SHOTS=DIR saves screenshots of the real pages there
(the ones in docs/img/ were made so)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from .procs import BIN, REPO, free_port, wait_until

pytestmark = pytest.mark.service

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
SHOTS = os.environ.get("DIVMERGE_DASHBOARD_SHOTS")
TEXTS = [["a b c", "cat dog up", "red blue", "1 2 3"], ["good bad", "left right", "x y z", "9 8"]]


@pytest.fixture(scope="module")
def server(svc):
    """``uvicorn --factory divmerge_api.main:create_app`` in its own process, on the session's database and broker."""
    port = free_port()
    log = open(svc.tmp / "dashboard-uvicorn.log", "w")  # noqa: SIM115
    cmd = [
        str(BIN / "uvicorn"),
        "--factory",
        "divmerge_api.main:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=svc.env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def up():
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None

    try:
        wait_until(up, 30, interval=0.2, what="uvicorn")
        assert proc.poll() is None, (svc.tmp / "dashboard-uvicorn.log").read_text()[-3000:]
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:  # never leave it behind
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def token(svc):
    """A token of a team of its own: the list shows only this module's jobs."""
    return svc.cli("token", "create", "--team", "dashboard-team").strip().splitlines()[-1]


class Api:
    def __init__(self, base: str, token: str):
        self.http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=10)

    def submit(self, body: dict) -> dict:
        r = self.http.post("/v1/merges", json=body)
        assert r.status_code == 202, r.text
        return r.json()

    def get(self, path: str) -> dict:
        r = self.http.get(path)
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, job_id: str, until=("succeeded", "failed", "cancelled"), timeout: float = 90) -> dict:
        def check():
            job = self.get(f"/v1/merges/{job_id}")
            return job if job["status"] in until else None

        return wait_until(check, timeout, interval=0.2, what=f"job {job_id} in {until}")


@pytest.fixture(scope="module")
def api(server, token):
    client = Api(server, token)
    yield client
    client.http.close()


class Browser:
    """One page in a fresh context; records console errors, page errors and requests to other hosts
    (which are aborted)."""

    def __init__(self, browser, base: str, width: int = 1280):
        self.base = base
        self.context = browser.new_context(viewport={"width": width, "height": 900}, accept_downloads=True)
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))

    def _route(self, route):
        url = route.request.url
        parts = urlsplit(url)
        if parts.scheme in ("http", "https") and f"{parts.scheme}://{parts.netloc}" != self.base:
            self.foreign.append(url)
            return route.abort()
        return route.continue_()

    def sign_in(self, token: str, path: str = "/", accepted: bool = True) -> None:
        self.page.goto(self.base + path)
        self.page.get_by_label("API token").fill(token)
        self.page.get_by_role("button", name="Sign in").click()
        self.page.wait_for_selector("#app:not([hidden])" if accepted else "#signin-error:not([hidden])")

    def status(self):
        return self.page.locator("#job-status")

    def shot(self, name: str) -> None:
        """The top of the page (at most 1100 px) as a PNG in $DIVMERGE_DASHBOARD_SHOTS."""
        if SHOTS:
            Path(SHOTS).mkdir(parents=True, exist_ok=True)
            bottom = self.page.evaluate("document.querySelector('main').getBoundingClientRect().bottom")
            height = min(1100, int(bottom))
            clip = {"x": 0, "y": 0, "width": self.page.viewport_size["width"], "height": height}
            self.page.screenshot(path=str(Path(SHOTS) / name), full_page=True, clip=clip)

    def fits(self, width: int) -> bool:
        """At this window width the page needs no horizontal scrolling."""
        self.page.set_viewport_size({"width": width, "height": 800})
        return self.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")

    def assert_clean(self) -> None:
        assert self.errors == [], self.errors
        assert self.foreign == [], self.foreign


@pytest.fixture(scope="module")
def chromium():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: run scripts/setup.sh"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def web(chromium, server):
    b = Browser(chromium, server)
    yield b
    b.context.close()


def divmerge_body(svc, epochs: int = 2, repeat: int = 1) -> dict:
    """A DivMerge job on the tiny GPT-2 models: 2 steps per epoch per repeat of the inline texts."""
    m = svc.models
    return {
        "merge_method": "divmerge",
        "base_model": str(m["gpt_base"]),
        "models": [
            {"model": str(m["gpt_ft1"]), "data": {"texts": TEXTS[0] * repeat}},
            {"model": str(m["gpt_ft2"]), "data": {"texts": TEXTS[1] * repeat}},
        ],
        "parameters": {
            "granularity": "layer",
            "epochs": epochs,
            "max_new_tokens": 4,
            "batch_size_per_task": 2,
        },
    }


def test_sign_in_keeps_the_token_out_of_urls_and_sign_out_forgets_it(web, token, server):
    page = web.page
    web.sign_in("dm_not_a_token", accepted=False)
    assert "not accepted" in page.locator("#signin-error").inner_text()
    assert page.evaluate("sessionStorage.length") == 0
    web.sign_in(token)
    assert token not in page.url
    assert page.evaluate("sessionStorage.getItem('divmerge.token')") == token
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_selector("#signin:not([hidden])")
    assert page.evaluate("sessionStorage.length") == 0
    assert page.locator("#app").is_hidden()
    web.errors = [e for e in web.errors if "401" not in e]  # the rejected token's answer
    web.assert_clean()


def test_list_and_learned_job_page(svc, api, web, token):
    svc.ensure_worker()
    job = api.submit(divmerge_body(svc, repeat=5))  # 20 inputs per task: 4 are held out
    classic = api.submit(svc.classic())
    other = str(svc.models["other"])  # a differently shaped model: the merge fails in the worker
    broken = api.submit({**svc.classic(), "models": [{"model": other, "name": f"o{i}"} for i in (1, 2)]})
    done = api.wait(job["id"])
    assert done["status"] == "succeeded", done["error"]
    api.wait(classic["id"])
    failed = api.wait(broken["id"])
    assert failed["status"] == "failed"
    page = web.page
    web.sign_in(token)

    row = page.locator(f'tr[data-job-id="{job["id"]}"]')
    row.wait_for()
    assert "succeeded" in row.inner_text() and "divmerge" in row.inner_text()
    ids = page.locator("tr[data-job-id]").evaluate_all("rows => rows.map(r => r.dataset.jobId)")
    assert ids == [broken["id"], classic["id"], job["id"]], "newest first"
    assert failed["error"]["code"] in page.locator(f'tr[data-job-id="{broken["id"]}"]').inner_text()
    page.select_option("#status-filter", "failed")
    row.wait_for(state="detached")
    assert "status=failed" in page.url
    assert page.locator("tr[data-job-id]").count() == 1
    page.select_option("#status-filter", "")
    row.wait_for()

    page.locator(f'tr[data-job-id="{broken["id"]}"] a').click()
    page.locator("#failure").wait_for()
    assert page.locator("#failure-code").inner_text() == failed["error"]["code"]
    assert page.locator("#failure-message").inner_text() == failed["error"]["message"]
    page.get_by_role("button", name="Retry").click()  # the same job runs again (and fails again)
    page.wait_for_function("() => document.querySelector('#events').textContent.includes('retry_requested')")
    page.wait_for_function("() => document.querySelector('#job-status').textContent === 'failed'")
    assert api.wait(broken["id"])["status"] == "failed"
    page.go_back()

    row.get_by_role("link").click()
    page.wait_for_url(f"**/jobs/{job['id']}")
    # a finished job's bar is full and spans its card (it was capped at 40rem: "done · 1/1" at ~60% width)
    bar = page.locator("#progress progress")
    bar.wait_for()
    assert bar.evaluate("b => b.position") == 1
    span = bar.evaluate(
        "b => { const c = document.getElementById('progress'); return b.getBoundingClientRect().width"
        " / c.getBoundingClientRect().width; }"
    )
    assert span > 0.98, f"the finished job's progress bar spans {span:.0%} of its card"
    coeffs = api.get(f"/v1/merges/{job['id']}/coefficients")
    curve = page.locator('[data-testid="loss-curve"] svg')
    heat = page.locator('[data-testid="coefficients-heatmap"] svg')
    heat.wait_for()
    for chart in (curve, heat):
        box = chart.bounding_box()
        assert box["width"] > 200 and box["height"] > 100, box
    points = curve.locator("polyline.train").get_attribute("points").split()
    assert len(points) == len(coeffs["losses"]) > 1
    # the held-out curve: one point per epoch and one before the first step, the kept epoch ringed
    assert [r[0] for r in coeffs["heldout"]] == [0, 1, 2] and coeffs["heldout_inputs"] == [4, 4]
    held = curve.locator("polyline.heldout").get_attribute("points").split()
    assert len(held) == len(coeffs["heldout"])
    assert curve.locator("circle.heldout-dot.best").get_attribute("data-epoch") == str(coeffs["best_epoch"])
    assert f"after epoch {coeffs['best_epoch']} (kept)" in page.locator("#loss-readout").inner_text()
    cells = heat.locator("rect[data-value]")
    assert cells.count() == len(coeffs["groups"]) * len(coeffs["tasks"]) > 2
    cells.nth(1).hover()
    value = coeffs["values"][0][1]
    assert f"{value:.4f}" in page.locator("#heatmap-readout").inner_text()
    heat.focus()  # keyboard: arrow keys move from the last cell read
    page.keyboard.press("ArrowDown")
    value = coeffs["values"][1][1]
    assert (
        f"{coeffs['groups'][1]} × {coeffs['tasks'][1]}: {value:.4f}"
        == page.locator("#heatmap-readout").inner_text()
    )

    assert page.locator("#model-card h3").first.inner_text() == "Merged model"
    assert "merge_method: divmerge" in page.locator("#spec").inner_text()
    assert yaml.safe_load(page.locator("#spec").inner_text()) == done["spec"]
    if page.locator("#events-section").is_visible():
        assert page.locator("#events li").count() > 0
    page.wait_for_selector("#files a")
    with page.expect_download() as dl:
        page.locator("#files a", has_text="README.md").click()
    readme = Path(done["result"]["destination"]) / "README.md"
    assert Path(dl.value.path()).read_text() == readme.read_text()
    web.shot("job.png")
    assert web.fits(380), "the job page scrolls sideways on a narrow window"
    page.go_back()
    row.wait_for()
    assert web.fits(380), "the jobs list scrolls sideways on a narrow window"
    web.assert_clean()


def test_cancel_a_running_learned_job_from_its_page(svc, api, web, token):
    """A long DivMerge job: its loss curve grows while it runs, then Cancel ends it cancelled."""
    svc.ensure_worker()
    job = api.submit(divmerge_body(svc, epochs=100, repeat=4))  # 800 steps
    web.sign_in(token)
    page = web.page
    label = f'tr[data-job-id="{job["id"]}"] .progress-label'
    page.wait_for_function(  # the list follows the running job: its stage, step and ETA
        "sel => /^optimise · \\d+\\/\\d+ · ETA /.test(document.querySelector(sel)?.textContent || '')",
        arg=label,
        timeout=60_000,
    )
    assert page.locator(f'tr[data-job-id="{job["id"]}"] progress').count() == 1
    web.shot("jobs.png")
    page.locator(f'tr[data-job-id="{job["id"]}"] a').click()
    page.wait_for_url(f"**/jobs/{job['id']}")
    page.wait_for_function(
        "() => (document.querySelector('[data-testid=loss-curve] polyline')?.getAttribute('points') || '')"
        ".split(' ').length >= 3",
        timeout=60_000,
    )
    first = len(page.locator('[data-testid="loss-curve"] polyline').get_attribute("points").split())
    page.wait_for_function(
        f"() => document.querySelector('[data-testid=loss-curve] polyline').getAttribute('points')"
        f".split(' ').length > {first}",
        timeout=30_000,
    )
    assert web.status().inner_text() == "running"
    web.shot("job-running.png")
    page.once("dialog", lambda d: d.accept())
    page.get_by_role("button", name="Cancel").click()
    page.wait_for_function(
        "() => document.querySelector('#job-status').textContent === 'cancelled'", timeout=30_000
    )
    assert api.get(f"/v1/merges/{job['id']}")["status"] == "cancelled"
    assert page.get_by_role("button", name="Retry").is_hidden()  # the API retries failed jobs only
    assert page.get_by_role("button", name="Cancel").is_hidden()
    web.assert_clean()


def test_submit_from_new_page(svc, api, web, token):
    svc.ensure_worker()
    page = web.page
    web.sign_in(token, "/new")
    editor = page.get_by_label("Merge config")
    page.wait_for_function("() => document.querySelector('#spec').value.includes('merge_method')")
    assert "merge_method: task_arithmetic" in editor.input_value()
    page.once("dialog", lambda d: d.accept())
    page.select_option("#template", "divmerge")
    page.wait_for_function("() => document.querySelector('#spec').value.includes('merge_method: divmerge')")

    bad = svc.classic()
    bad["models"][1]["model"] = str(svc.models["ft2"].parent / "no-such-model")
    text = yaml.safe_dump(bad, sort_keys=False)
    line = 1 + next(i for i, t in enumerate(text.splitlines()) if "no-such-model" in t)
    editor.fill(text)
    page.get_by_role("button", name="Validate").click()
    problem = page.locator("#problems li").first
    problem.wait_for(timeout=60_000)
    assert f"line {line} · models.1.model" in problem.inner_text()
    assert page.locator("#gutter .mark").inner_text() == f"! {line}"
    problem.get_by_role("button").click()  # puts the caret on that line
    assert page.evaluate("document.activeElement.id") == "spec"
    web.shot("new.png")

    editor.fill(yaml.safe_dump(svc.classic(), sort_keys=False))
    page.get_by_role("button", name="Validate").click()
    page.wait_for_function(
        "() => document.querySelector('#new-status').textContent === 'Valid.'", timeout=60_000
    )
    assert page.locator("#problems li").count() == 0 and page.locator("#gutter .mark").count() == 0
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url("**/jobs/*")
    page.wait_for_function(
        "() => document.querySelector('#job-status').textContent === 'succeeded'", timeout=60_000
    )
    job_id = page.url.rsplit("/", 1)[1]
    job = api.get(f"/v1/merges/{job_id}")
    assert job["status"] == "succeeded" and job["spec"]["merge_method"] == "task_arithmetic"
    page.locator("#files a", has_text="model.safetensors").wait_for()
    web.assert_clean()


def test_model_card_markdown_is_escaped(web, token):
    """Card text cannot add markup: script, images (a request elsewhere), javascript: links."""
    web.sign_in(token)
    html = web.page.evaluate(
        """async () => {
            const { renderMarkdown } = await import('/static/js/markdown.js');
            return renderMarkdown('# T <b>x</b>\\n\\n<script>alert(1)</script> <img src=x onerror=alert(1)>' +
              ' [a](javascript:alert(1)) ![i](http://evil.example/x.png) `<i>c</i>`\\n\\n| a | b |\\n|---|---|\\n| <u>1</u> | 2 |');
        }"""
    )
    for bad in ("<script", "<img", "<b>", "<u>", "<i>", "javascript:"):
        assert bad not in html, html
    assert "&lt;script&gt;" in html and "<table>" in html and "<code>&lt;i&gt;c&lt;/i&gt;</code>" in html
    assert '<a href="http://evil.example/x.png"' in html  # an image is a link, never fetched
    web.assert_clean()


def test_problem_fields_map_to_editor_lines(web, token):
    """/new marks a problem at the line of its field, for lists indented under their key or not."""
    text = (
        "merge_method: divmerge  # a comment\n"
        "models:\n"
        "  - model: a\n"
        "    data:\n"
        "      texts: [x]\n"
        "  - model: b\n"
        "    parameters: {weight: 1}\n"
        "parameters:\n"
        "  lr: 0.1\n"
        "other:\n"
        "- x: 1\n"
        "- y: 2\n"
    )
    fields = ["merge_method", "models.1.model", "models.0.data.texts", "models[1].parameters.weight",
              "parameters.lr", "parameters.epochs", "other.1.y", "nowhere"]  # fmt: skip
    web.sign_in(token)
    lines = web.page.evaluate(
        """async ([text, fields]) => {
            const { fieldLines, lineOf } = await import('/static/js/yaml.js');
            const map = fieldLines(text);
            return fields.map((f) => lineOf(map, f));
        }""",
        [text, fields],
    )
    assert lines == [1, 6, 5, 7, 9, 8, 12, None]
    web.assert_clean()


def test_evaluation_panel_shows_bars_anp_and_unparsed(svc, api, web, token):
    """A job comparing two methods on eval sets: the panel has one row per task, a bar for the expert and
    for each merge (the selected one marked), the ANP with its interval, and the unparsed share."""
    svc.ensure_worker()
    m = svc.models
    body = {
        "merge_method": "linear",
        "models": [
            {
                "model": str(m["gpt_ft1"]),
                "name": "colours",
                "eval": {
                    "texts": ["red blue", "cat dog", "x y"],
                    "labels": ["red", "cat", "red"],
                    "max_new_tokens": 4,
                },
            },
            {"model": str(m["gpt_ft2"]), "name": "plain", "eval": {"texts": ["up down", "a b c"]}},
        ],
        "evaluation": {
            "compare": [{"method": "linear", "parameters": {"normalize": False}}],
            "select": "best",
        },
    }
    done = api.wait(api.submit(body)["id"], timeout=120)
    assert done["status"] == "succeeded", done["error"]
    ev = api.get(f"/v1/merges/{done['id']}/evaluation")
    web.sign_in(token, f"/jobs/{done['id']}")
    page = web.page
    page.locator('[data-testid="evaluation"] tr[data-task]').first.wait_for()
    rows = page.locator('[data-testid="evaluation"] tr[data-task]')
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.task)") == ["colours", "plain"]
    first = rows.nth(0)
    bars = first.locator(".eval-bar")
    assert bars.evaluate_all("bs => bs.map(b => b.dataset.series)") == ["expert", "linear", "linear#2"]
    merged = ev["compare"][1]["tasks"]["colours"]["merged"]
    assert float(bars.nth(2).get_attribute("data-value")) == pytest.approx(merged)
    assert first.locator(".eval-bar.selected .eval-name").inner_text() == ev["selected"]
    width = bars.nth(0).locator(".eval-fill").evaluate("e => e.getBoundingClientRect().width")
    track = bars.nth(0).locator(".eval-track").evaluate("e => e.getBoundingClientRect().width")
    assert width == pytest.approx(track * ev["tasks"]["colours"]["expert"], abs=1.5)
    unparsed = f"{100 * ev['tasks']['colours']['unparsed']:.1f}"
    assert first.locator("td.num").nth(1).inner_text() == unparsed
    assert page.locator('[data-testid="anp"]').inner_text() == f"ANP {ev['anp']:.1f}"
    assert "js_retention" in rows.nth(1).text_content()
    web.shot("evaluation.png")
    assert web.fits(380), "the evaluation panel scrolls sideways on a narrow window"
    web.assert_clean()


def test_the_dashboard_takes_the_job_statuses_from_the_service():
    """One list of statuses (divmerge_service.models.JobStatus): the pages' scripts import it from
    /dashboard/constants.js and the jobs page's filter is rendered from it; no copy in the static files."""
    import re

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from divmerge_api.routers import dashboard
    from divmerge_service.models import FINISHED, JobStatus

    app = FastAPI()
    dashboard.install(app)
    client = TestClient(app)
    js = client.get("/dashboard/constants.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert f"export const STATUSES = {json.dumps([s.value for s in JobStatus])};" in js.text
    assert f"export const FINISHED = {json.dumps([s.value for s in FINISHED])};" in js.text
    page = client.get("/").text
    assert re.findall(r'<option value="(\w+)">', page) == [s.value for s in JobStatus]
    static = dashboard.ASSETS / "static" / "js"
    for path in static.glob("*.js"):
        assert '"cancelled"' not in path.read_text(), f"{path.name} keeps its own list of statuses"
