"""The web dashboard: three HTML pages (``/``, ``/jobs/{id}``, ``/new``) and their assets under ``/static``,
all files of ``api/dashboard/`` (no CDN, no build step). The pages hold no data: their scripts call the
JSON API with the bearer token that the sign-in form keeps in the tab's sessionStorage."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from string import Template

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(__file__).resolve().parents[1] / "dashboard"

#: Everything comes from this origin; no inline script (the pages' scripts are files under /static).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

#: page name -> (title, script under static/js)
PAGES = {"jobs": ("Merge jobs", "jobs.js"), "job": ("Merge job", "job.js"), "new": ("New merge", "new.js")}

router = APIRouter(include_in_schema=False)


@cache
def render(page: str) -> str:
    """The layout (header, sign-in form) around one page's body."""
    title, script = PAGES[page]
    layout = Template((ASSETS / "layout.html").read_text(encoding="utf-8"))
    body = (ASSETS / "pages" / f"{page}.html").read_text(encoding="utf-8")
    return layout.substitute(title=title, script=script, content=body)


def _page(page: str) -> HTMLResponse:
    return HTMLResponse(render(page), headers=HEADERS)


@router.get("/", response_class=HTMLResponse)
def jobs_page() -> HTMLResponse:
    return _page("jobs")


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str) -> HTMLResponse:  # the script reads the id from the URL
    return _page("job")


@router.get("/new", response_class=HTMLResponse)
def new_page() -> HTMLResponse:
    return _page("new")


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=ASSETS / "static"), name="static")
