"""``/admin/jobs``: queues (pause, resume), jobs filtered, one job, bulk retry/cancel/delete."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

import orjson
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from surge.admin.console import views
from surge.admin.console.service import console as console_service
from surge.admin.console.session import ConsoleError, as_dict, first
from surge.admin.console.views import e, form, page, table, when
from surge.admin.console.web import CallerDep, html, posted, redirect
from surge.kit.jobs.queue import JobFilter, get_job, list_jobs, paused_queues, queue_stats
from surge.kit.web.deps import SessionDep, request_id

router = APIRouter(include_in_schema=False)


def _filter(queue: str, state: str, name: str, search: str) -> JobFilter:
    return JobFilter(
        queue=queue or None, state=state or None, name=name or None, search=search or None
    )


@router.get("/jobs")
async def jobs(
    *,
    caller: CallerDep,
    db: SessionDep,
    queue: Annotated[str, Query(max_length=100)] = "",
    state: Annotated[str, Query(max_length=20)] = "",
    name: Annotated[str, Query(max_length=200)] = "",
    search: Annotated[str, Query(max_length=200)] = "",
    flash: str = "",
) -> Response:
    csrf = caller.session.csrf
    paused = await paused_queues(db)
    stats = {s.queue: s for s in await queue_stats(db)}
    queues = sorted(set(stats) | set(paused) | ({queue} if queue else set()))
    queue_rows = []
    for q in queues:
        s = stats.get(q)
        is_paused = q in paused
        toggle = form(
            f"/admin/jobs/queues/{q}/{'resume' if is_paused else 'pause'}", csrf,
            "Resume" if is_paused else "Pause", button_id=f"{'resume' if is_paused else 'pause'}-{q}",
        )  # fmt: skip
        queue_rows.append(
            (e(q), "⏸ paused" if is_paused else "running", e(s.ready if s else 0),
             e(s.active if s else 0), e(f"{s.oldest_age_seconds:.1f} s" if s else "0 s"), toggle)
        )  # fmt: skip
    flt = _filter(queue, state, name, search)
    found = await list_jobs(db, flt, limit=100)
    states = ["", "queued", "active", "succeeded", "failed", "cancelled"]
    options = "".join(
        f'<option value="{s}"{" selected" if s == state else ""}>{s or "any state"}</option>'
        for s in states
    )
    filter_form = (
        '<form method="get" action="/admin/jobs" class="filters" id="job-filter">'
        f'<input name="queue" placeholder="queue" value="{e(queue)}">'
        f'<select name="state">{options}</select>'
        f'<input name="name" placeholder="job name" value="{e(name)}">'
        f'<input name="search" placeholder="payload or error contains" value="{e(search)}">'
        "<button>Filter</button></form>"
    )
    kept = {"queue": queue, "state": state, "name": name, "search": search}
    bulk = "".join(
        form("/admin/jobs/bulk", csrf, label, fields={**kept, "action": action},
             button_id=f"bulk-{action}")
        for action, label in (("retry", "Retry matching…"), ("cancel", "Cancel matching…"),
                              ("delete", "Delete matching…"))
    )  # fmt: skip
    rows = [
        (f'<a href="/admin/jobs/{j.id}">{j.id}</a>', e(j.queue), e(j.name), e(j.state),
         e(j.attempts), when(j.finished_at or j.run_at), e((j.last_error or "")[:120]))
        for j in found
    ]  # fmt: skip
    body = (
        "<h3>Queues</h3>"
        + table(["queue", "state", "ready", "running", "lag", ""], queue_rows, table_id="queues")
        + "<h3>Jobs</h3>"
        + filter_form
        + f'<div class="bulk">{bulk}</div>'
        + table(
            ["id", "queue", "job", "state", "attempts", "at", "last error"], rows, table_id="jobs"
        )
    )
    return html(page("Jobs", body, caller, active="jobs", flash=flash))


@router.get("/jobs/{job_id}")
async def job_detail(caller: CallerDep, db: SessionDep, job_id: int) -> Response:
    job = await get_job(db, job_id)
    if job is None:
        raise ConsoleError(f"No job {job_id}", status_code=404)
    facts = [
        ("queue", e(job.queue)), ("job", e(job.name)), ("state", e(job.state)),
        ("attempts", f"{job.attempts} of {job.max_attempts or 'default'}"),
        ("stalls", e(job.stalls)), ("created", when(job.created_at)), ("run at", when(job.run_at)),
        ("started", when(job.started_at)), ("finished", when(job.finished_at)),
        ("worker", e(job.worker)), ("dedup key", e(job.dedup_key)),
        ("payload", f"<pre>{e(orjson.dumps(job.payload, option=orjson.OPT_INDENT_2).decode())}</pre>"),
        ("last error", f"<pre id=last-error>{e(job.last_error or '–')}</pre>"),
    ]  # fmt: skip
    actions = ""
    filt = {"job_id": str(job.id)}
    if job.state in {"failed", "cancelled"}:
        actions += form(
            "/admin/jobs/bulk", caller.session.csrf, "Retry…", fields={**filt, "action": "retry"}
        )
    if job.state == "queued":
        actions += form(
            "/admin/jobs/bulk", caller.session.csrf, "Cancel…", fields={**filt, "action": "cancel"}
        )
    body = table(["", ""], facts) + actions
    return html(page(f"Job {job.id}", body, caller, active="jobs"))


@router.post("/jobs/queues/{queue}/{verb}")
async def queue_toggle(
    queue: str, verb: str, request: Request, caller: CallerDep, db: SessionDep
) -> Response:
    fields = await posted(request, caller)
    if verb not in {"pause", "resume"}:
        raise ConsoleError("Unknown action", status_code=404)
    if first(fields, "confirm") != "yes":
        question = (
            f"Pause queue {queue}? Workers stop taking its jobs (running ones finish)."
            if verb == "pause"
            else f"Resume queue {queue}? Workers take its jobs again."
        )
        return html(views.confirm(caller, title=f"{verb.title()} a queue", question=question,
                                  action=str(request.url.path), fields={}, active="jobs"))  # fmt: skip
    await console_service.set_queue_paused(
        db, caller, queue=queue, paused=verb == "pause", request_id=request_id(request)
    )
    done = "paused" if verb == "pause" else "resumed"
    return redirect(f"/admin/jobs?queue={quote(queue)}&flash=Queue+{quote(queue)}+{done}")


@router.post("/jobs/bulk")
async def jobs_bulk(request: Request, caller: CallerDep, db: SessionDep) -> Response:
    fields = await posted(request, caller)
    action = first(fields, "action")
    job_id = first(fields, "job_id")
    flt = _filter(
        first(fields, "queue"),
        first(fields, "state"),
        first(fields, "name"),
        first(fields, "search"),
    )
    if job_id.isdigit():
        flt = JobFilter(job_id=int(job_id))
    count = await console_service.job_count(db, action=action, flt=flt)
    if first(fields, "confirm") != "yes":
        return html(
            views.confirm(
                caller, title=f"{action.title()} jobs",
                question=f"{action.title()} every {'' if job_id else 'matching '}job"
                f"{' ' + job_id if job_id else ' (' + _describe(flt) + ')'}?",
                action="/admin/jobs/bulk", fields=as_dict(fields), active="jobs", count=count,
                danger=action == "delete",
            )
        )  # fmt: skip
    changed = await console_service.job_bulk(
        db, caller, action=action, flt=flt, expected=int(first(fields, "expected", "0") or 0),
        request_id=request_id(request),
    )  # fmt: skip
    return redirect(f"/admin/jobs?flash={action.title()}:+{changed}+job(s)")


def _describe(flt: JobFilter) -> str:
    return ", ".join(f"{k} = {v}" for k, v in flt.__dict__.items() if v) or "all jobs"
