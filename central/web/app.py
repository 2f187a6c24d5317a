"""The review page (Flask, server-rendered), served by ``iaflash-central serve`` on 127.0.0.1.

Reviewers log in with a name and password checked against hashes in a users file
(``name:<werkzeug hash>`` lines, written by ``iaflash-central reviewer``). Pages:

- ``/``: the queue, strongest evidence first (or by plate: ``?rank=plate``), filters site, date,
  level, status;
- ``/flags/<event_id>``: top-k beside the registered make/model, thresholds, model, site, time, the
  evidence image with the vehicle box drawn and the crop (after "fetch evidence", which sends the
  signed ``send_evidence`` command to the box and stores the answer at central), the plate's other
  flags and impossible journeys, the decision form and the flag's audit trail;
- ``/audit`` and ``/export/<flags|decisions|labels>.<csv|ndjson>``.

Every POST carries a per-session CSRF token; every decision and fetch is written to the audit log.
"""

from __future__ import annotations

import csv
import io
import json
import secrets
import struct
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flask import Flask, Response, abort, redirect, render_template, request, session, url_for
from werkzeug.security import check_password_hash

from iaflash.central.serve.plates import plate_scores
from iaflash.central.serve.store import ACTIONS, Store, parse_time

__all__ = ["EvidenceFetcher", "create_app", "jpeg_size", "load_users", "training_labels"]

EvidenceFetcher = Callable[[str, str, str], tuple[dict[str, Any], bytes]]
LEVELS = ("make", "model")
STATUSES = ("open", "closed", "dismissed", "cannot_tell")


def load_users(path: Path) -> dict[str, str]:
    """``name → password hash`` from a users file; ValueError naming the line to fix."""
    users = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, hashed = line.strip().partition(":")
        if not sep or not name or not hashed:
            raise ValueError(f"{path}:{n}: expected 'name:hash' (fix: write it with `iaflash-central reviewer NAME`)")
        users[name] = hashed
    return users


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's SOF marker, or None when it has none."""
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h
        i += 2 + length
    return None


def vehicle_box(sidecar: Mapping[str, Any] | None, doc: Mapping[str, Any]) -> list[float] | None:
    """The vehicle box [x, y, w, h] in frame pixels: the one the box classified, else the radar's sidecar box."""
    image = (doc.get("verdict", {}).get("evidence") or {}).get("image") or {}
    crop = image.get("crop") if isinstance(image, dict) else None
    box = (crop or {}).get("box") if isinstance(crop, dict) else None
    box = box or (image.get("vehicle_box") if isinstance(image, dict) else None) or (sidecar or {}).get("vehicle_box")
    return [float(v) for v in box] if isinstance(box, list) and len(box) == 4 else None


def training_labels(store: Store) -> list[dict[str, Any]]:
    """Decisions as training labels (image, make, model, view, x1, y1, x2, y2).

    A false flag means the photo shows the registered vehicle: labelled with the registry's make and
    model. A confirmed clone is labelled only when the reviewer wrote what the photo shows.
    """
    latest: dict[str, dict[str, Any]] = {}
    for row in store.audit_log():
        if row["action"] in ACTIONS:
            latest[row["event_id"]] = row
    labels = []
    for event_id, row in latest.items():
        flag, ev = store.flag(event_id), store.evidence(event_id)
        if flag is None or ev is None:
            continue
        registry = flag["doc"]["verdict"].get("registry") or {}
        if row["action"] == "false_flag":
            make, model = row["make"] or registry.get("make"), row["model"] or registry.get("model")
        elif row["action"] == "confirmed_clone":
            make, model = row["make"], row["model"]
        else:
            continue
        if not make or not model:
            continue
        box = vehicle_box(ev[0], flag["doc"])
        x1y1x2y2 = [round(box[0]), round(box[1]), round(box[0] + box[2]), round(box[1] + box[3])] if box else [""] * 4
        view = {"approaching": "front", "receding": "rear"}.get(str(ev[0].get("direction")), "")
        labels.append(
            dict(
                zip(
                    ("image", "make", "model", "view", "x1", "y1", "x2", "y2"),
                    (f"{event_id}.jpg", make, model, view, *x1y1x2y2),
                    strict=True,
                )
            )
        )
    return labels


def _when(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _csv(rows: Iterable[Mapping[str, Any]], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return out.getvalue()


def create_app(  # noqa: PLR0915  # one closure per route: the routes read as one page map
    store: Store,
    users: Mapping[str, str],
    *,
    fetch_evidence: EvidenceFetcher | None = None,
    coordinates: Mapping[str, tuple[float, float]] | None = None,
    max_speed_kmh: float = 250.0,
    secret_key: str | None = None,
) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=secret_key or secrets.token_hex(32), SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict"
    )
    app.jinja_env.filters["when"] = _when
    app.jinja_env.globals["ACTIONS"] = ACTIONS

    def reviewer() -> str:
        name = session.get("reviewer")
        if not isinstance(name, str) or name not in users:
            abort(redirect(url_for("login", next=request.full_path)))
        return name

    def check_csrf() -> None:
        if not secrets.compare_digest(str(request.form.get("csrf", "")), str(session.get("csrf", "-"))):
            abort(400, "the form's CSRF token is missing or stale: reload the page and try again")

    @app.context_processor
    def _globals() -> dict[str, Any]:
        return {"reviewer": session.get("reviewer"), "csrf": session.get("csrf", "")}

    @app.get("/login")
    def login() -> str:
        return render_template("login.html", error=None, next=request.args.get("next", "/"))

    @app.post("/login")
    def login_post() -> Any:
        name, password = request.form.get("name", ""), request.form.get("password", "")
        hashed = users.get(name)
        if hashed is None or not check_password_hash(hashed, password):
            store.count("login_refused")
            return render_template("login.html", error="unknown reviewer or wrong password", next="/"), 401
        session.clear()
        session["reviewer"], session["csrf"] = name, secrets.token_urlsafe(24)
        target = request.form.get("next") or "/"
        return redirect(target if target.startswith("/") and not target.startswith("//") else "/")

    @app.post("/logout")
    def logout() -> Any:
        check_csrf()
        session.clear()
        return redirect(url_for("login"))

    def filters() -> dict[str, Any]:
        args = request.args
        day = lambda k: parse_time(args[k] + "T00:00:00+00:00") if args.get(k) else None  # noqa: E731
        until = day("until")
        return {
            "site": args.get("site") or None,
            "since": day("since"),
            "until": until + 86400 if until is not None else None,
            "level": args.get("level") if args.get("level") in LEVELS else None,
            "status": args.get("status")
            if args.get("status") in STATUSES
            else ("open" if "status" not in args else None),
        }

    @app.get("/")
    def queue() -> str:
        reviewer()
        flags = store.flags(**filters())
        plates = plate_scores(flags, store.sightings, coordinates, max_speed_kmh)
        by_plate = {p.plate_key: p for p in plates}
        rank = request.args.get("rank", "evidence")
        if rank == "plate":
            order = {p.plate_key: i for i, p in enumerate(plates)}
            flags.sort(key=lambda f: (order.get(f["plate_key"], len(order)), -f["log_lr"]))
        return render_template(
            "queue.html",
            flags=flags,
            by_plate=by_plate,
            args=request.args,
            rank=rank,
            levels=LEVELS,
            statuses=STATUSES,
            counters=store.counters(),
        )

    @app.get("/flags/<event_id>")
    def flag(event_id: str) -> str:
        reviewer()
        row = store.flag(event_id)
        if row is None:
            abort(404, f"no flag {event_id} in the store")
        ev = store.evidence(event_id)
        size = jpeg_size(ev[1]) if ev else None
        box = vehicle_box(ev[0] if ev else None, row["doc"])
        plate = None
        if row["plate_key"]:
            [plate] = plate_scores(
                store.flags(plate_key=row["plate_key"], status=None), store.sightings, coordinates, max_speed_kmh
            ) or [None]
        return render_template(
            "flag.html",
            f=row,
            v=row["doc"]["verdict"],
            evidence=ev,
            size=size,
            box=box,
            plate=plate,
            audit=store.audit_log(event_id),
            can_fetch=fetch_evidence is not None,
        )

    @app.get("/flags/<event_id>/evidence.jpg")
    def evidence_image(event_id: str) -> Response:
        reviewer()
        ev = store.evidence(event_id)
        if ev is None:
            abort(404, "no evidence stored for this flag yet: use 'fetch evidence' on its page")
        return Response(ev[1], mimetype="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/flags/<event_id>/fetch")
    def fetch(event_id: str) -> Any:
        name = reviewer()
        check_csrf()
        row = store.flag(event_id)
        if row is None:
            abort(404)
        if fetch_evidence is None:
            abort(409, "serve was started without --command-key: it cannot ask boxes for evidence")
        try:
            sidecar, jpeg = fetch_evidence(row["site_id"], row["device_id"], row["capture_id"])
        except (TimeoutError, RuntimeError, ValueError) as exc:
            store.count("evidence_fetch_failed")
            store.audit(reviewer=name, event_id=event_id, action="evidence_failed", note=str(exc)[:500])
            abort(502, f"the box did not send the evidence: {exc}")
        store.put_evidence(event_id, sidecar, jpeg)
        store.audit(reviewer=name, event_id=event_id, action="evidence_fetched", note=f"{len(jpeg)} bytes")
        return redirect(url_for("flag", event_id=event_id))

    @app.post("/flags/<event_id>/decision")
    def decide(event_id: str) -> Any:
        name = reviewer()
        check_csrf()
        action = request.form.get("action", "")
        if action not in ACTIONS:
            abort(400, f"action {action!r} is not one of {', '.join(ACTIONS)}")
        try:
            store.decide(
                event_id,
                reviewer=name,
                action=action,
                note=request.form.get("note", ""),
                make=request.form.get("make", ""),
                model=request.form.get("model", ""),
            )
        except KeyError:
            abort(404, f"no flag {event_id}")
        return redirect(url_for("flag", event_id=event_id))

    @app.get("/audit")
    def audit() -> str:
        reviewer()
        return render_template("audit.html", rows=store.audit_log())

    @app.get("/export/<what>.<fmt>")
    def export(what: str, fmt: str) -> Response:
        name = reviewer()
        if what == "flags":
            columns = [
                "event_id",
                "site_id",
                "device_id",
                "capture_id",
                "captured_at",
                "outcome",
                "level",
                "plate_key",
                "p_registered",
                "log_lr",
                "status",
                "payload_site",
            ]
            rows: list[dict[str, Any]] = store.flags(
                **{**filters(), "status": request.args.get("status") or None}, limit=1_000_000
            )
        elif what == "decisions":
            columns = ["id", "at_ts", "reviewer", "event_id", "action", "note", "make", "model"]
            rows = [r for r in store.audit_log() if r["action"] in ACTIONS]
        elif what == "labels":
            columns = ["image", "make", "model", "view", "x1", "y1", "x2", "y2"]
            rows = training_labels(store)
        else:
            abort(404, "exports: flags, decisions, labels")
        store.audit(reviewer=name, event_id="-", action=f"export_{what}", note=fmt)
        if fmt == "csv":
            return Response(_csv(rows, columns), mimetype="text/csv")
        if fmt == "ndjson":
            text = "".join(
                json.dumps(r if what != "flags" else {**{c: r[c] for c in columns}, "event": r["doc"]}, default=str)
                + "\n"
                for r in rows
            )
            return Response(text, mimetype="application/x-ndjson")
        abort(404, "formats: csv, ndjson")

    return app
