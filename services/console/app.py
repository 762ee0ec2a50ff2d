"""The console's routes: Starlette, server-rendered Jinja2 pages (autoescaped), a little JS.

Every handler goes through :func:`Console.page`, which loads the session, sends a visitor
who has not logged in to the login form, checks the CSRF token on every POST, and turns a
service's error into the page (or JSON) with its message and a meaningful status.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import jinja2
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from novelcrafter.config import get_settings
from novelcrafter.errors import InvalidArgument, NotFound, NovelCrafterError
from novelcrafter.layout import MAX_FILENAME_BYTES, MAX_TITLE_CHARS, check_book_id
from novelcrafter.logs import get_logger, kv
from novelcrafter.progress import CallbackView, describe_event, follow
from novelcrafter.v1 import inference_pb2, ingest_pb2, jobs_pb2

from . import forms, views
from .backends import Backends, call, http_status, ingest_stream, iterate_in_thread
from .security import COOKIE, Guard, LoginThrottle, Session, safe_next

log = get_logger(__name__)
HERE = Path(__file__).parent
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
}
PREVIEW_CHUNKS = 3  # the first chunks of training text shown on a book's page
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def max_upload_bytes() -> int:
    return int(get_settings().max_upload_mb * (1 << 20))


@dataclass
class Context:
    request: Request
    session: Session
    form: dict[str, str]


Handler = Callable[[Context], Awaitable[Response]]


class Console:
    def __init__(self, backends: Backends, guard: Guard) -> None:
        self.backends = backends
        self.guard = guard
        self.throttle = LoginThrottle()  # one per process: every client's attempts together
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,  # every page: a title with <script> renders as text
            undefined=jinja2.StrictUndefined,
        )

    # --- plumbing ------------------------------------------------------------------------------

    def render(self, ctx: Context, name: str, status: int = 200, **values: Any) -> HTMLResponse:
        html = self.templates.get_template(name).render(
            csrf=ctx.session.csrf,
            auth_required=self.guard.required,
            path=ctx.request.url.path,
            **values,
        )
        return HTMLResponse(html, status_code=status)

    def page(self, handler: Handler, *, login: bool = True, form: bool = True, api: bool = False) -> Callable:
        """Wrap a handler: session, login, CSRF on POST, errors shown with their status."""

        async def endpoint(request: Request) -> Response:
            session = self.guard.load(request.cookies.get(COOKIE))
            ctx = Context(request, session, {})
            try:
                response = await self._guarded(handler, ctx, login=login, form=form, api=api)
            except NovelCrafterError as exc:
                response = self._error(ctx, exc.message, http_status(exc), api)
            except ClientDisconnect:
                return Response(status_code=499)
            if session.fresh:
                response.headers.append("set-cookie", self.guard.cookie_header(session))
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            return response

        return endpoint

    async def _guarded(
        self, handler: Handler, ctx: Context, *, login: bool, form: bool, api: bool
    ) -> Response:
        request = ctx.request
        if login and not ctx.session.authenticated:
            if request.method == "GET" and not api:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
            return self._error(ctx, "log in first: this console needs the access token", 401, api)
        if request.method == "POST":
            if form and request.headers.get("content-type", "").startswith(
                "application/x-www-form-urlencoded"
            ):
                ctx.form = forms.parse_form(await _read_limited(request, forms.MAX_FORM_BYTES))
            supplied = ctx.form.get("csrf") or request.headers.get("x-csrf-token")
            if not self.guard.csrf_ok(ctx.session, supplied):
                log.info("csrf check failed", extra=kv(path=request.url.path))
                return self._error(
                    ctx, "the form had expired or did not come from this console (CSRF check failed): "
                    "reload the page and try again", 403, api
                )  # fmt: skip
        return await handler(ctx)

    def _error(self, ctx: Context, message: str, status: int, api: bool) -> Response:
        if api:
            return JSONResponse({"error": message}, status_code=status)
        return self.render(ctx, "error.html", status=status, message=message, status_code=status)

    # --- login ---------------------------------------------------------------------------------

    async def login_form(self, ctx: Context) -> Response:
        if not self.guard.required:
            return RedirectResponse("/books", status_code=303)
        return self.render(
            ctx, "login.html", next=safe_next(ctx.request.query_params.get("next")), failed=False
        )

    async def login(self, ctx: Context) -> Response:
        target = safe_next(ctx.form.get("next"))
        wait = self.throttle.reserve()
        if wait is None:
            log.info("console login throttled")
            busy = "Too many login attempts right now. Wait a few seconds and try again."
            response = self.render(ctx, "login.html", status=429, next=target, failed=busy)
            response.headers["retry-after"] = "5"
            return response
        await asyncio.sleep(wait)
        if not self.guard.check_token(ctx.form.get("token", "")):
            log.info("console login refused")  # never the supplied value
            await asyncio.sleep(1.0)  # slows down guessing
            wrong = "That token is not right. Try again."
            return self.render(ctx, "login.html", status=401, next=target, failed=wrong)
        session = self.guard.new_session(authenticated=True)  # a new CSRF token after login
        response = RedirectResponse(target, status_code=303)
        response.headers.append("set-cookie", self.guard.cookie_header(session))
        log.info("console login")
        return response

    async def logout(self, ctx: Context) -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.headers.append("set-cookie", self.guard.cookie_header(self.guard.new_session()))
        return response

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    # --- books ---------------------------------------------------------------------------------

    async def _list_books(self) -> ingest_pb2.ListBooksResponse:
        """Every book: ListBooks answers a page at a time (bounded), so follow its pages."""
        books = ingest_pb2.ListBooksResponse()
        token = ""
        for _ in range(10_000):  # a bound even if a server kept answering the same token
            page = await call(
                "ingest",
                self.backends.ingest.ListBooks,
                ingest_pb2.ListBooksRequest(page_size=1000, page_token=token),
                timeout=30,
            )
            books.books.extend(page.books)
            if not page.next_page_token or page.next_page_token == token:
                break
            token = page.next_page_token
        return books

    async def books(self, ctx: Context) -> Response:
        listing = await self._list_books()
        books = sorted(listing.books, key=lambda b: -b.created_at)
        return self.render(
            ctx,
            "books.html",
            books=books,
            when=views.when,
            limit_mb=f"{max_upload_bytes() / (1 << 20):g}",
        )

    async def upload(self, ctx: Context) -> Response:
        """The PDF is the raw request body (sent by the page's script with its progress bar);
        the options come in the query string. Streamed to IngestBook as it arrives."""
        q = ctx.request.query_params
        filename = (q.get("filename") or "book.pdf").encode()[:MAX_FILENAME_BYTES].decode("utf-8", "ignore")
        if not filename.lower().endswith(".pdf"):
            raise InvalidArgument(f"{filename!r} is not a PDF: choose a .pdf file")
        limit = max_upload_bytes()
        announced = ctx.request.headers.get("content-length", "")
        if announced.isdigit() and int(announced) > limit:
            raise _too_large(limit)
        metadata = ingest_pb2.IngestMetadata(
            filename=filename,
            title=(q.get("title") or "").strip()[:MAX_TITLE_CHARS],
            params=forms.ingest_params(q),
            size_bytes=int(announced) if announced.isdigit() else 0,
        )
        result = await ingest_stream(self.backends, metadata, ctx.request.stream(), limit)
        book = result.manifest
        log.info("console upload", extra=kv(book_id=book.book_id, already_existed=result.already_existed))
        return JSONResponse(
            {
                "book_id": book.book_id,
                "already_existed": result.already_existed,
                "url": f"/books/{book.book_id}",
            },
            status_code=200 if result.already_existed else 201,
        )

    async def book(self, ctx: Context) -> Response:
        book_id = _book_id(ctx.request.path_params["book_id"])
        got = await call(
            "ingest",
            self.backends.ingest.GetBook,
            ingest_pb2.GetBookRequest(book_id=book_id, preview_chunks=PREVIEW_CHUNKS),
            timeout=30,
        )
        listing = await call(
            "coordinator", self.backends.jobs.ListJobs, jobs_pb2.ListJobsRequest(book_id=book_id), timeout=30
        )
        manifest = got.manifest
        cleaning = sorted(manifest.cleaning.items())
        return self.render(
            ctx,
            "book.html",
            book=manifest,
            preview=list(got.preview),
            cleaning=cleaning,
            removed=[(k, v) for k, v in cleaning if v],
            jobs=[views.job_view(j) for j in sorted(listing.jobs, key=lambda j: -j.created_at)],
            when=views.when,
        )

    # --- training ------------------------------------------------------------------------------

    async def jobs(self, ctx: Context) -> Response:
        listing = await call(
            "coordinator", self.backends.jobs.ListJobs, jobs_pb2.ListJobsRequest(), timeout=30
        )
        books = await self._list_books()
        titles = {b.book_id: b.title for b in books.books}
        return self.render(
            ctx,
            "jobs.html",
            jobs=[views.job_view(j) for j in sorted(listing.jobs, key=lambda j: -j.created_at)],
            books=sorted(books.books, key=lambda b: -b.created_at),
            titles=titles,
            selected=ctx.request.query_params.get("book", ""),
        )

    async def create_job(self, ctx: Context) -> Response:
        book_id = _book_id(ctx.form.get("book_id", ""))
        config = forms.job_config(ctx.form)
        job = await call(
            "coordinator",
            self.backends.jobs.CreateJob,
            jobs_pb2.CreateJobRequest(book_id=book_id, config=config),
            timeout=30,
        )
        log.info("console created job", extra=kv(job_id=job.job_id, book_id=book_id))
        return RedirectResponse(f"/jobs/{job.job_id}", status_code=303)

    async def _job(self, ctx: Context) -> jobs_pb2.Job:
        job_id = ctx.request.path_params["job_id"]
        return await call(
            "coordinator", self.backends.jobs.GetJob, jobs_pb2.GetJobRequest(job_id=job_id), timeout=30
        )

    async def job(self, ctx: Context) -> Response:
        job = await self._job(ctx)
        try:
            book = await call(
                "ingest",
                self.backends.ingest.GetBook,
                ingest_pb2.GetBookRequest(book_id=job.book_id),
                timeout=30,
            )
            title = book.manifest.title
        except NovelCrafterError:
            title = ""  # the job page still works while ingest is away
        return self.render(ctx, "job.html", job=views.job_view(job), title=title)

    async def job_parts(self, ctx: Context) -> Response:
        job = await self._job(ctx)
        return self.render(ctx, "_job_status.html", job=views.job_view(job))

    async def cancel_job(self, ctx: Context) -> Response:
        job_id = ctx.request.path_params["job_id"]
        await call(
            "coordinator", self.backends.jobs.CancelJob, jobs_pb2.CancelJobRequest(job_id=job_id), timeout=30
        )
        return RedirectResponse(f"/jobs/{job_id}", status_code=303)

    async def job_events(self, ctx: Context) -> Response:
        """Server-sent events from WatchJob (replayed from the start, or after Last-Event-ID)."""
        # A reconnecting EventSource sends back an id we wrote (a sequence number); anything
        # else (not ASCII digits, beyond int64) is refused rather than failing the stream.
        last = ctx.request.headers.get("last-event-id", "").strip()
        if last and not (last.isascii() and last.isdigit() and len(last) <= 18):
            raise InvalidArgument(f"Last-Event-ID must be an event sequence number (got {last[:40]!r})")
        after = int(last or 0)
        job = await self._job(ctx)  # 404 now, as a status, rather than inside the stream
        # The shared channel: one connection however many pages are open. Leaving the page
        # cancels this page's calls, never the channel.
        channel, cancel = self.backends.cancellable(self.backends.ingest_address)

        def produce(emit: Callable[[Any], None]) -> None:
            view = CallbackView(lambda e: emit(("event", e)))
            final = follow(channel, job.job_id, view, after_sequence=after)
            emit(("end", final))

        async def events() -> AsyncIterator[bytes]:
            try:
                async for kind, item in iterate_in_thread(produce, cancel):
                    if kind == "event":
                        data = views.event_data(item, describe_event(item))
                        yield _sse(data, event="job", id=item.sequence)
                    else:
                        yield _sse({"state": views.job_view(item)["state"]}, event="end")
            except NovelCrafterError as exc:
                yield _sse({"error": exc.message}, event="failure")

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    # --- try it --------------------------------------------------------------------------------

    async def _choices(self) -> tuple[list[Any], dict[str, list[str]]]:
        books = await self._list_books()
        versions: dict[str, list[str]] = {}
        try:
            adapters = await call(
                "inference",
                self.backends.inference.ListAdapters,
                inference_pb2.ListAdaptersRequest(),
                timeout=30,
            )
        except NovelCrafterError:
            adapters = inference_pb2.ListAdaptersResponse()  # inference still loading: no list yet
        for info in adapters.adapters:
            v = info.version
            versions.setdefault(v.book_id, []).extend([f"part-{v.part}", v.version])
        return sorted(books.books, key=lambda b: -b.created_at), versions

    async def try_page(self, ctx: Context) -> Response:
        books, versions = await self._choices()
        form = {"book_id": ctx.request.query_params.get("book", ""), "adapter": "latest"}
        return self.render(ctx, "try.html", books=books, versions=versions, form=form, results=None)

    async def try_submit(self, ctx: Context) -> Response:
        """Without JavaScript: both continuations at once, rendered in the page."""
        base, tuned = forms.comparison(ctx.form)
        stub = self.backends.inference
        both = await asyncio.gather(
            call("inference", stub.Generate, base, timeout=300),
            call("inference", stub.Generate, tuned, timeout=300),
        )
        books, versions = await self._choices()
        results = [
            {"side": side, "text": r.text, "version": _version(r.adapter), "finish": r.finish_reason}
            for side, r in zip(("base", "tuned"), both, strict=True)
        ]
        return self.render(ctx, "try.html", books=books, versions=versions, form=ctx.form, results=results)

    async def try_stream(self, ctx: Context) -> Response:
        """Base and tuned streamed side by side: newline-delimited JSON pieces tagged by side."""
        requests = dict(zip(("base", "tuned"), forms.comparison(ctx.form), strict=True))
        stub = self.backends.inference
        calls: list[Any] = []

        def produce(emit: Callable[[Any], None]) -> None:
            def one(side: str) -> None:
                try:
                    stream = stub.GenerateStream(requests[side], timeout=300)
                    calls.append(stream)
                    for piece in stream:
                        emit((side, piece))
                except grpc.RpcError as exc:  # shown on its side; the other side carries on
                    emit((side, exc))

            other = threading.Thread(target=one, args=("base",), daemon=True)
            other.start()
            one("tuned")
            other.join()

        def stop() -> None:
            for c in calls:
                c.cancel()

        async def lines() -> AsyncIterator[bytes]:
            async for side, item in iterate_in_thread(produce, stop):
                if isinstance(item, BaseException):
                    message = item.details() if isinstance(item, grpc.RpcError) else str(item)
                    yield _ndjson({"side": side, "error": message or "generation failed"})
                    continue
                data: dict[str, Any] = {"side": side, "text": item.text}
                if item.HasField("adapter"):
                    data["version"] = _version(item.adapter)
                if item.finish_reason:
                    data["finish"] = item.finish_reason
                yield _ndjson(data)

        return StreamingResponse(lines(), media_type="application/x-ndjson", headers=SSE_HEADERS)

    # --- adapters ------------------------------------------------------------------------------

    async def adapters(self, ctx: Context) -> Response:
        adapters = await call(
            "inference", self.backends.inference.ListAdapters, inference_pb2.ListAdaptersRequest(), timeout=30
        )
        books = await self._list_books()
        listing = await call(
            "coordinator", self.backends.jobs.ListJobs, jobs_pb2.ListJobsRequest(), timeout=30
        )
        titles = {b.book_id: b.title for b in books.books}
        metrics = {p.adapter_version: p.metrics for j in listing.jobs for p in j.parts if p.adapter_version}
        grouped: dict[str, list[dict[str, Any]]] = {}
        for info in sorted(adapters.adapters, key=lambda a: (a.version.book_id, -a.version.published_at)):
            v = info.version
            m = metrics.get(v.version)
            grouped.setdefault(v.book_id, []).append(
                {
                    "version": v.version,
                    "part": v.part,
                    "job_id": v.job_id,
                    "published": views.when(v.published_at),
                    "latest": info.latest,
                    "state": info.state,
                    "error": info.error,
                    "rank": info.rank,
                    "base_ppl": f"{m.base_perplexity:.2f}" if m and m.base_perplexity else "",
                    "adapter_ppl": f"{m.adapter_perplexity:.2f}" if m and m.adapter_perplexity else "",
                }
            )
        return self.render(ctx, "adapters.html", grouped=grouped, titles=titles)

    async def adapter_card(self, ctx: Context) -> Response:
        book_id = _book_id(ctx.request.path_params["book_id"])
        version = ctx.request.path_params["version"]
        answer = await call(
            "ingest",
            self.backends.ingest.GetAdapterCard,
            ingest_pb2.GetAdapterCardRequest(book_id=book_id, adapter=version),
            timeout=30,
        )
        front, body = views.split_front_matter(answer.model_card)
        return self.render(
            ctx,
            "adapter.html",
            version=answer.version,
            published=views.when(answer.version.published_at),
            front_matter=front,
            card=Markup(views.render_markdown(body)),  # markdown-it, raw HTML off
        )

    async def adapter_download(self, ctx: Context) -> Response:
        """The version as a zip (PEFT folder + model card), streamed from ExportAdapter."""
        book_id = _book_id(ctx.request.path_params["book_id"])
        request = ingest_pb2.ExportAdapterRequest(book_id=book_id, adapter=ctx.request.path_params["version"])
        stream = self.backends.ingest.ExportAdapter(request, timeout=600)
        pieces = iterate_in_thread(lambda emit: [emit(p) for p in stream], stream.cancel)
        first = await anext(pieces)  # errors (no such version) become the page's status, not a broken zip
        filename = re.sub(r"[^A-Za-z0-9._-]", "_", first.filename) or "adapter.zip"

        async def body() -> AsyncIterator[bytes]:
            try:
                yield first.data
                async for piece in pieces:
                    yield piece.data
            finally:
                await pieces.aclose()  # the browser left: cancel the export stream

        return StreamingResponse(
            body(),
            media_type="application/zip",
            headers={"content-disposition": f'attachment; filename="{filename}"'},
        )

    # --- the app -------------------------------------------------------------------------------

    def app(self) -> Starlette:
        p = self.page
        routes = [
            Route("/health", self.health),
            Route("/", p(_home)),
            Route("/login", p(self.login_form, login=False)),
            Route("/login", p(self.login, login=False), methods=["POST"]),
            Route("/logout", p(self.logout), methods=["POST"]),
            Route("/books", p(self.books)),
            Route("/books", p(self.upload, form=False, api=True), methods=["POST"]),
            Route("/books/{book_id}", p(self.book)),
            Route("/jobs", p(self.jobs)),
            Route("/jobs", p(self.create_job), methods=["POST"]),
            Route("/jobs/{job_id}", p(self.job)),
            Route("/jobs/{job_id}/status", p(self.job_parts)),
            Route("/jobs/{job_id}/events", p(self.job_events, api=True)),
            Route("/jobs/{job_id}/cancel", p(self.cancel_job), methods=["POST"]),
            Route("/try", p(self.try_page)),
            Route("/try", p(self.try_submit), methods=["POST"]),
            Route("/try/stream", p(self.try_stream, api=True), methods=["POST"]),
            Route("/adapters", p(self.adapters)),
            Route("/adapters/{book_id}/{version}", p(self.adapter_card)),
            Route("/adapters/{book_id}/{version}/download", p(self.adapter_download)),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        app = Starlette(routes=routes)
        app.add_exception_handler(404, self._not_found)
        app.add_exception_handler(405, self._not_allowed)
        return app

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return await self.page(lambda ctx: _raise(NotFound("no such page")), login=False)(request)

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": "method not allowed"}, status_code=405)


async def _home(ctx: Context) -> Response:
    return RedirectResponse("/books", status_code=303)


async def _raise(exc: NovelCrafterError) -> Response:
    raise exc


def _book_id(raw: str) -> str:
    try:
        return check_book_id(raw.strip())
    except NovelCrafterError:
        raise InvalidArgument(f"not a book id: {raw[:40]!r} (16 hex digits)")


def _too_large(limit: int) -> NovelCrafterError:
    from .backends import UploadTooLarge

    return UploadTooLarge(
        f"the file is larger than the {limit / (1 << 20):g} MB limit (NOVELCRAFTER_MAX_UPLOAD_MB)"
    )


def _version(adapter: Any) -> str:
    return "base" if adapter.version in ("", "base") else f"{adapter.book_id}:{adapter.version}"


async def _read_limited(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise InvalidArgument(f"form too large (over {limit // 1024} KB)")
    return bytes(body)


def _sse(data: Any, *, event: str, id: int | None = None) -> bytes:
    head = f"event: {event}\n" + (f"id: {id}\n" if id is not None else "")
    return f"{head}data: {json.dumps(data)}\n\n".encode()


def _ndjson(data: dict[str, Any]) -> bytes:
    return (json.dumps(data) + "\n").encode()
