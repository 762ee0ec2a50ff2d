"""The web console's routes without a browser, against real services: auth, CSRF, bad input,
missing things, escaping, streamed upload limits.

A real ingest + coordinator process (with a bearer token) and a real console process; the
inference service is deliberately absent, so its pages must say so instead of failing blankly.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
from console_support import ConsoleProc, csrf_of, login, start_console
from fault_support import TOKEN, Service, book_pdf, start_ingest
from novelcrafter.console.forms import job_config
from novelcrafter.console.security import Guard, safe_next
from novelcrafter.console.views import curve_points, part_row
from support import free_port, run_cli

from novelcrafter.errors import InvalidArgument
from novelcrafter.v1 import jobs_pb2

pytestmark = pytest.mark.integration
WRONG = "wrong-token-that-must-not-leak-4d2c"
HOSTILE = '<script>alert("pwned")</script> & "friends"'


@pytest.fixture(scope="module")
def ingest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("console-ingest")
    ingest = start_ingest(str(tmp / "store"), tmp, env={"NOVELCRAFTER_AUTH_TOKEN": TOKEN})
    yield ingest
    ingest.stop()
    assert TOKEN not in ingest.output() and WRONG not in ingest.output(), "a token leaked into a log"


@pytest.fixture(scope="module")
def console(ingest: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleProc]:
    tmp = tmp_path_factory.mktemp("console")
    env = {"NOVELCRAFTER_AUTH_TOKEN": TOKEN, "NOVELCRAFTER_MAX_UPLOAD_MB": "1"}
    # Nothing listens on the inference address: pages that need it must explain.
    console = start_console(tmp, ingest.address, f"127.0.0.1:{free_port()}", env=env)
    yield console
    console.stop()
    assert TOKEN not in console.output() and WRONG not in console.output(), "a token leaked into a log"


@pytest.fixture
def client(console: ConsoleProc) -> tuple[requests.Session, str]:
    session = requests.Session()
    return session, login(session, console.url, TOKEN)


def _upload(
    session: requests.Session, url: str, data: bytes, csrf: str | None, **params: str
) -> requests.Response:
    headers = {"Content-Type": "application/pdf"}
    if csrf is not None:
        headers["X-CSRF-Token"] = csrf
    return session.post(f"{url}/books", params={"filename": "book.pdf", **params}, data=data, headers=headers)


@pytest.mark.timeout(120)
def test_without_login_pages_redirect_and_posts_are_refused(console: ConsoleProc) -> None:
    anonymous = requests.Session()
    page = anonymous.get(f"{console.url}/books?x=1", allow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login?next=%2Fbooks%3Fx%3D1"
    login_page = anonymous.get(f"{console.url}/login")
    assert login_page.status_code == 200 and 'type="password"' in login_page.text
    csrf = csrf_of(login_page.text)
    for path, data in (("/jobs", {"book_id": "0123456789abcdef"}), ("/try", {"prompt": "x"})):
        answer = anonymous.post(f"{console.url}{path}", data={"csrf": csrf, **data}, allow_redirects=False)
        assert answer.status_code == 401 and "log in first" in answer.text
    assert _upload(anonymous, console.url, book_pdf(20), csrf).status_code == 401
    events = anonymous.get(f"{console.url}/jobs/j-0123456789ab/events")
    assert events.status_code == 401 and events.json()["error"].startswith("log in first")
    assert anonymous.get(f"{console.url}/health").json() == {"status": "ok"}  # probes need no login


@pytest.mark.timeout(120)
def test_login_with_a_wrong_token_is_refused_and_the_right_one_sets_a_strict_cookie(
    console: ConsoleProc,
) -> None:
    session = requests.Session()
    csrf = csrf_of(session.get(f"{console.url}/login").text)
    wrong = session.post(f"{console.url}/login", data={"csrf": csrf, "token": WRONG, "next": "/jobs"})
    assert wrong.status_code == 401 and "not right" in wrong.text and WRONG not in wrong.text
    # Login is a POST like any other: without the form's CSRF token it is refused.
    forged = session.post(f"{console.url}/login", data={"token": TOKEN}, allow_redirects=False)
    assert forged.status_code == 403
    good = session.post(
        f"{console.url}/login",
        data={"csrf": csrf, "token": TOKEN, "next": "//evil.example/"},
        allow_redirects=False,
    )
    assert good.status_code == 303 and good.headers["location"] == "/books"  # no open redirect
    cookie = good.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert TOKEN not in cookie and TOKEN not in good.headers.get("location", "")
    books = session.get(f"{console.url}/books")
    assert books.status_code == 200 and TOKEN not in books.text
    assert csrf_of(books.text) != csrf  # a new CSRF token after login
    logout = session.post(f"{console.url}/logout", data={"csrf": csrf_of(books.text)}, allow_redirects=False)
    assert logout.status_code == 303
    assert session.get(f"{console.url}/books", allow_redirects=False).status_code == 303


@pytest.mark.timeout(120)
def test_every_post_needs_the_csrf_token(console: ConsoleProc, client: tuple[requests.Session, str]) -> None:
    session, _ = client
    for token in (None, "", "not-the-token"):
        data = {"book_id": "0123456789abcdef"} | ({"csrf": token} if token is not None else {})
        answer = session.post(f"{console.url}/jobs", data=data, allow_redirects=False)
        assert answer.status_code == 403 and "CSRF" in answer.text, token
        assert _upload(session, console.url, book_pdf(20), token).status_code == 403
        cancel = session.post(f"{console.url}/jobs/j-0123456789ab/cancel", data=data, allow_redirects=False)
        assert cancel.status_code == 403
    # A forged or tampered session cookie is no session at all.
    forged = requests.Session()
    forged.cookies.set("nc_session", session.cookies["nc_session"][:-4] + "AAAA")
    assert forged.get(f"{console.url}/books", allow_redirects=False).status_code == 303


@pytest.mark.timeout(180)
def test_bad_uploads_get_a_clear_message_and_status(
    console: ConsoleProc, client: tuple[requests.Session, str]
) -> None:
    session, csrf = client
    not_pdf = _upload(session, console.url, b"this is a text file, not a book", csrf)
    assert not_pdf.status_code == 400 and "not a PDF" in not_pdf.json()["error"]
    wrong_name = _upload(session, console.url, book_pdf(20), csrf, filename="notes.txt")
    assert wrong_name.status_code == 400 and "choose a .pdf file" in wrong_name.json()["error"]
    empty = _upload(session, console.url, b"", csrf)
    assert empty.status_code == 400 and "no file received" in empty.json()["error"]
    big = _upload(session, console.url, b"%PDF-1.4\n" + b"0" * (2 << 20), csrf)  # limit: 1 MB
    assert big.status_code == 413 and "1 MB limit" in big.json()["error"]
    # Sent without a length (chunked), the stream is cut off at the limit while it arrives.
    chunked = session.post(
        f"{console.url}/books",
        params={"filename": "big.pdf"},
        data=iter([b"%PDF-1.4\n", *([b"0" * 65536] * 40)]),
        headers={"X-CSRF-Token": csrf, "Content-Type": "application/pdf"},
    )
    assert chunked.status_code == 413 and "NOVELCRAFTER_MAX_UPLOAD_MB" in chunked.json()["error"]
    bad_parts = _upload(session, console.url, book_pdf(20), csrf, parts="many")
    assert bad_parts.status_code == 400 and "parts must be a whole number" in bad_parts.json()["error"]


@pytest.mark.timeout(180)
def test_missing_things_are_404_and_bad_ids_400(
    console: ConsoleProc, client: tuple[requests.Session, str]
) -> None:
    session, csrf = client
    missing = session.get(f"{console.url}/books/0123456789abcdef")
    assert missing.status_code == 404 and "no book 0123456789abcdef" in missing.text
    bad = session.get(f"{console.url}/books/..%2Fetc")
    assert bad.status_code in (400, 404)
    assert session.get(f"{console.url}/books/not-a-book-id").status_code == 400
    assert session.get(f"{console.url}/jobs/j-0123456789ab").status_code == 404
    assert session.get(f"{console.url}/jobs/j-0123456789ab/events").status_code == 404
    assert session.get(f"{console.url}/no/such/page").status_code == 404
    train = session.post(f"{console.url}/jobs", data={"csrf": csrf, "book_id": "0123456789abcdef"})
    assert train.status_code == 404
    bad_setting = session.post(
        f"{console.url}/jobs", data={"csrf": csrf, "book_id": "0123456789abcdef", "epochs": "three"}
    )
    assert bad_setting.status_code == 400 and "epochs must be a whole number" in bad_setting.text
    no_prompt = session.post(f"{console.url}/try", data={"csrf": csrf, "book_id": "0123456789abcdef"})
    assert no_prompt.status_code == 400 and "write a prompt" in no_prompt.text
    card = session.get(f"{console.url}/adapters/0123456789abcdef/latest")
    assert card.status_code == 404 and "unknown book 0123456789abcdef" in card.text
    download = session.get(f"{console.url}/adapters/0123456789abcdef/part-0/download")
    assert download.status_code == 404 and "text/html" in download.headers["content-type"]
    assert session.get(f"{console.url}/adapters/0123456789abcdef/bad%20version").status_code == 400
    # Inference is down: the page says which service and why, with 503.
    adapters = session.get(f"{console.url}/adapters")
    assert adapters.status_code == 503 and "inference" in adapters.text


@pytest.mark.timeout(300)
def test_a_hostile_title_renders_as_text(console: ConsoleProc, client: tuple[requests.Session, str]) -> None:
    session, csrf = client
    answer = _upload(session, console.url, book_pdf(60, seed=41), csrf, title=HOSTILE, parts="2")
    assert answer.status_code in (200, 201), answer.text
    book_id = answer.json()["book_id"]
    for page in (f"/books/{book_id}", "/books", "/jobs", "/try"):
        html = session.get(f"{console.url}{page}").text
        assert "<script>alert" not in html, page
        assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt; &amp; &#34;friends&#34;" in html, page


def test_session_cookies_are_signed_and_expire() -> None:
    guard = Guard("secret-token")
    session = guard.new_session(authenticated=True)
    assert guard.load(guard.dump(session)).authenticated
    assert not Guard("another-token").load(guard.dump(session)).authenticated  # key follows the token
    body, _, signature = guard.dump(session).partition(".")
    assert not guard.load(body[:-2] + "xx." + signature).authenticated
    session.issued -= 13 * 3600
    assert not guard.load(guard.dump(session)).authenticated
    assert Guard(None).new_session().authenticated  # no token configured: no login
    assert [safe_next(t) for t in ("/jobs?x=1", "//evil", "https://evil", "/\\evil", None)] == [
        "/jobs?x=1", "/books", "/books", "/books", "/books",
    ]  # fmt: skip


@pytest.mark.timeout(300)
def test_a_job_started_in_the_page_is_watched_and_cancelled(
    console: ConsoleProc, client: tuple[requests.Session, str]
) -> None:
    """No trainer runs here: the job waits, the event stream says so, Cancel ends it."""
    session, csrf = client
    answer = _upload(session, console.url, book_pdf(60, seed=42), csrf, parts="2")
    book_id = answer.json()["book_id"]
    started = session.post(
        f"{console.url}/jobs", data={"csrf": csrf, "book_id": book_id, "max_steps_per_part": "2"}
    )
    assert started.status_code == 200 and "/jobs/j-" in started.url
    job_id = started.url.rsplit("/", 1)[-1]
    assert "2 steps/part" in started.text and "READY" in started.text
    cancelled = session.post(f"{console.url}/jobs/{job_id}/cancel", data={"csrf": csrf})
    assert cancelled.status_code == 200 and 'id="job-state">CANCELLED<' in cancelled.text
    # The live stream replays every event, then ends with the final state.
    with session.get(f"{console.url}/jobs/{job_id}/events", stream=True, timeout=60) as events:
        assert events.headers["content-type"].startswith("text/event-stream")
        text = events.text
    assert f"job {job_id} PENDING" in text and "part 00 READY" in text
    assert text.rstrip().endswith('event: end\ndata: {"state": "CANCELLED"}')
    book_page = session.get(f"{console.url}/books/{book_id}").text
    assert "CANCELLED" in book_page  # the book's jobs
    chunks = re.findall(r'<blockquote class="chunk">(.*?)</blockquote>', book_page, re.S)
    assert "The first chunks of training text" in book_page and 1 <= len(chunks) <= 3
    assert all(chunk.strip().endswith(".") for chunk in chunks), chunks  # whole sentences of the book


def test_part_rows_show_memorization_and_style_when_measured() -> None:
    metrics = jobs_pb2.PartMetrics(train_loss=2.5, base_perplexity=40.0, adapter_perplexity=31.5, steps=3)
    metrics.loss_curve.extend([3.0, 2.0, 2.5])
    part = jobs_pb2.Part(index=4, state=jobs_pb2.PART_STATE_SUCCEEDED, metrics=metrics, adapter_version="v")
    row = part_row(part)
    assert (row["base_ppl"], row["adapter_ppl"], row["better"], row["judged"]) == ("40.00", "31.50", True, [])
    assert curve_points([3.0, 2.0, 2.5]) == "0.0,2.0 80.0,38.0 160.0,20.0"  # highest loss at the top
    judged_metrics = part.metrics  # the Part holds its own copy
    judged_metrics.memorization.prompts = 16
    judged_metrics.memorization.adapter.extraction_rate = 0.25
    judged_metrics.style.metric, judged_metrics.style.base, judged_metrics.style.adapter = (
        "burrows_delta",
        1.2,
        0.9,
    )
    judged = part_row(part)["judged"]
    assert "memorization on 16 training prompts" in judged[0] and "adapter 25% extracted" in judged[0]
    assert judged[1].startswith("style burrows_delta base 1.200 → adapter 0.900")


def test_job_settings_from_the_form() -> None:
    config = job_config(
        {"max_steps_per_part": "2", "memorization_prompts": "0", "epochs": "", "device": "cpu"}
    )
    training = config.training
    assert (training.max_steps_per_part, training.warmup_steps, training.checkpoint_every) == (2, 1, 2)
    assert training.HasField("memorization_prompts") and training.memorization_prompts == 0  # 0 = off
    assert not training.HasField("style_prompts") and training.epochs == 0  # empty = the default
    assert config.device == "cpu"
    with pytest.raises(InvalidArgument, match="device must be any, cpu or cuda"):
        job_config({"device": "tpu"})


def test_serve_console_with_a_bad_address_is_one_error_line() -> None:
    done = run_cli("serve", "console", "--listen", "nonsense", timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "error: cannot listen on 'nonsense' (console): expected HOST:PORT, e.g. 127.0.0.1:8080"
    ]


@pytest.mark.timeout(300)
def test_an_upload_streams_through_the_console_without_being_held_in_memory(
    ingest: Service, tmp_path: Path
) -> None:
    """80 MB pass through a console whose memory never grows by anything like 80 MB: the body
    goes on to ingest piece by piece (ingest then refuses it: no PDF header)."""
    size_mb = 80
    console = start_console(
        tmp_path, ingest.address, f"127.0.0.1:{free_port()}", env={"NOVELCRAFTER_AUTH_TOKEN": TOKEN}
    )
    try:
        session = requests.Session()
        csrf = login(session, console.url, TOKEN)
        process = psutil.Process(console.proc.pid)
        baseline = process.memory_info().rss
        peak = [baseline]
        sent = [0]

        def body() -> Iterator[bytes]:
            piece = b"x" * 65536
            for _ in range(size_mb * 16):
                sent[0] += len(piece)
                if sent[0] % (4 << 20) == 0:  # sample the console's memory as the upload goes
                    peak[0] = max(peak[0], process.memory_info().rss)
                yield piece

        answer = session.post(
            f"{console.url}/books",
            params={"filename": "big.pdf"},
            data=body(),
            headers={"X-CSRF-Token": csrf, "Content-Type": "application/pdf"},
            timeout=240,
        )
        assert sent[0] == size_mb << 20
        assert answer.status_code == 400 and "not a PDF" in answer.json()["error"], answer.text
        grown_mb = (peak[0] - baseline) / (1 << 20)
        assert grown_mb < size_mb / 4, f"the console grew by {grown_mb:.0f} MB during an {size_mb} MB upload"
    finally:
        console.stop()
