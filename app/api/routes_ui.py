"""The web dashboard at `/ui`: static files only, no server-side rendering and no new API.

The page is a client of the public JSON API like any other (it logs in with `POST /auth/token`
and sends the bearer token), so it can show nothing an API client could not see and needs no
privileged path into the gateway. Only the files present in `app/ui/static` at start are
served, by exact name, so a request can never reach outside that folder.

Content-Security-Policy: every other answer carries `default-src 'none'` (see hardening.py),
which would block the page's own script and stylesheet. The middleware keeps a CSP a route sets
itself, so these answers carry one that opens exactly what the dashboard needs: script, style,
icon and `fetch` from this origin. Still no inline script or style ('unsafe-inline' is never
allowed: an injected `<script>` or `style=` does not run), no plugins, no `<base>` rewrites, no
form posts (the login form is sent by the script), and no framing.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.errors import NotFound

STATIC_DIR = Path(__file__).resolve().parents[1] / "ui" / "static"

DASHBOARD_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

# With X-Content-Type-Options: nosniff the browser refuses a module script or a stylesheet
# whose type is not exactly right, so the types are fixed here, not guessed from the system.
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


def _servable(folder: Path) -> dict[str, Path]:
    """File name -> path for the files the dashboard may serve (known types, no subfolders)."""
    if not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in MEDIA_TYPES}


FILES = _servable(STATIC_DIR)

router = APIRouter(include_in_schema=False)


def _file(name: str) -> FileResponse:
    path = FILES.get(name)
    if path is None:
        raise NotFound(f"no dashboard file {name!r}")
    return FileResponse(
        path,
        media_type=MEDIA_TYPES[path.suffix],
        headers={"Content-Security-Policy": DASHBOARD_CSP},
    )


# GET and HEAD: `curl -I` and uptime checks probe a page with HEAD.
@router.api_route("/ui", methods=["GET", "HEAD"])
@router.api_route("/ui/", methods=["GET", "HEAD"])
async def dashboard() -> FileResponse:
    """The page itself; it loads its script and stylesheet by absolute `/ui/...` paths, so it
    works with and without the trailing slash."""
    return _file("index.html")


@router.api_route("/ui/{name}", methods=["GET", "HEAD"])
async def dashboard_file(name: str) -> FileResponse:
    return _file(name)
