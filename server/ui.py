"""The chat page at / : static HTML, CSS and JS from server/static/, no build step, nothing remote.

The page talks to /v1 like any other client (with the key the person types, sent as
Authorization: Bearer). Its responses carry a strict Content-Security-Policy: only this
server's own script, styles and connections; no inline script, no frames.
--no-ui (Settings.ui = False) leaves this blueprint out, so / is a 404 again.
"""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, request, send_from_directory

STATIC = Path(__file__).parent / "static"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

# The app itself has no static folder (create_app passes static_folder=None: Flask's default
# would serve <cwd>/static to anyone); the page's files come from this blueprint only.
bp = Blueprint("ui", __name__, static_folder=str(STATIC), static_url_path="/static")


@bp.get("/")
def index():
    resp = send_from_directory(STATIC, "index.html", max_age=0)
    resp.headers["Cache-Control"] = "no-cache"
    return resp


@bp.after_app_request
def _headers(resp: Response) -> Response:
    if request.endpoint not in ("ui.index", "ui.static"):
        return resp
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Referrer-Policy"] = "no-referrer"
    return resp
