"""The web console in a real headless Chromium (Debian's ``chromium``, driven by Playwright from
PyPI; no browser download), as an author would use it, against the real services as processes:
log in (refused without the token), upload a corpus book, start a tiny job, watch every part
finish live, read the adapters, compare base and tuned text streamed side by side, try a hostile
title and a bad file, log out. A screenshot of each page is saved (``$NOVELCRAFTER_TEST_ARTIFACTS``
or the test's tmp dir).
"""

from __future__ import annotations

import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_support import ConsoleProc, artifacts_dir, chromium_path, start_console
from fault_support import TOKEN, book_pdf, start_inference, start_ingest, start_trainer
from support import BOOKS, require_shared

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.slow]
WRONG = "wrong-token-that-must-not-leak-4d2c"
HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> & Sons'
# A job that trains in about a minute on a CPU: 2 parts, 2 steps each, judging off.
TINY = {
    "epochs": "1",
    "learning_rate": "1e-3",
    "max_steps_per_part": "2",
    "max_length": "64",
    "grad_accum": "1",
    "eval_max_chunks": "1",
    "memorization_prompts": "0",
    "style_prompts": "0",
}


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    executable = chromium_path()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip) is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleProc]:
    """ingest + coordinator, one trainer, inference and the console, all with the token."""
    book_dir = require_shared(BOOKS)
    assert (book_dir / "robin-hood.pdf").exists()
    tmp = tmp_path_factory.mktemp("console-browser")
    store = str(tmp / "store")
    env = {"NOVELCRAFTER_AUTH_TOKEN": TOKEN}
    ingest = start_ingest(store, tmp, env=env)
    trainer = start_trainer(store, ingest.address, tmp, env=env)
    inference = start_inference(
        store, tmp, env={**env, "NOVELCRAFTER_WATCH_INTERVAL": "1"}, health_timeout=300
    )
    console = start_console(tmp, ingest.address, inference.address, env=env)
    yield console
    outputs = []
    for service in (console, trainer, inference, ingest):
        service.stop()
        outputs.append(service.output())
    for text in outputs:
        assert TOKEN not in text and WRONG not in text, "a token leaked into a log"


def _shot(page: Any, folder: Path, name: str) -> None:
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


@pytest.mark.timeout(900)
def test_an_author_logs_in_uploads_trains_watches_and_compares(
    chromium: Any, stack: ConsoleProc, tmp_path: Path
) -> None:
    shots = artifacts_dir(tmp_path)
    url = stack.url
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)

    # Refused without the token; the login form asks for it once.
    page.goto(f"{url}/books")
    assert "/login?next=" in page.url
    page.fill("#token", WRONG)
    page.click("form.card button[type=submit]")
    assert "not right" in page.inner_text("#login-error")
    assert WRONG not in page.content()
    _shot(page, shots, "01-login-refused")
    page.fill("#token", TOKEN)
    page.keyboard.press("Enter")  # with the keyboard, as anywhere in the console
    page.wait_for_url(f"{url}/books")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    cookie = next(c for c in context.cookies() if c["name"] == "nc_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TOKEN not in cookie["value"]
    assert TOKEN not in page.content()

    # A bad file: the server's message, in the page.
    page.set_input_files(
        "#file", {"name": "notes.pdf", "mimeType": "application/pdf", "buffer": b"just text"}
    )
    page.click("#upload-button")
    page.wait_for_selector("#upload-error:not([hidden])")
    assert "not a PDF" in page.inner_text("#upload-error")
    _shot(page, shots, "02-books-bad-file")

    # Upload a corpus book (file picker), two parts.
    page.set_input_files("#file", str(BOOKS / "robin-hood.pdf"))
    page.click("#upload summary")
    page.fill("#parts", "2")
    page.click("#upload-button")
    page.wait_for_url(f"{url}/books/*", timeout=300_000)
    book_id = page.url.rsplit("/", 1)[-1]
    assert page.inner_text("#book-title").strip()
    assert "2\nparts" in page.inner_text(".stats")
    assert "page numbers" in page.inner_text("main")  # what cleaning removed
    assert page.locator("blockquote.chunk").count() == 3  # the first chunks of training text
    _shot(page, shots, "03-book")

    # Train it with tiny settings (the advanced fold), then watch it live.
    page.click("form.train summary")
    for name, value in TINY.items():
        page.fill(f"#{name}", value)
    page.focus("#train-button")
    page.keyboard.press("Enter")
    page.wait_for_url(f"{url}/jobs/j-*")
    job_id = page.url.rsplit("/", 1)[-1]
    # A selector wait, not wait_for_function: polling a JS string needs eval, which the
    # console's Content-Security-Policy (script-src 'self') rightly refuses.
    page.wait_for_selector("#events li", state="attached")
    _shot(page, shots, "04-training-live")
    page.wait_for_selector("body[data-job-done=yes]", timeout=600_000)
    assert page.inner_text("#job-state") == "SUCCEEDED", page.inner_text("main")
    for part in (0, 1):
        row = page.inner_text(f"#part-{part}")
        assert "SUCCEEDED" in row and "→" in row and f"{job_id}-p0{part}" in row, row
        assert page.get_attribute(f"#part-{part} polyline", "points"), "no loss curve drawn"
    events = page.inner_text("#events")
    assert "part 00 step 2/2" in events and "part 01 SUCCEEDED" in events and "SUCCEEDED" in events
    assert page.is_hidden("#cancel-form")
    _shot(page, shots, "05-training-done")

    # Adapters: every version, the newest is latest (reload until inference has picked it up).
    deadline = time.monotonic() + 180
    while True:
        page.goto(f"{url}/adapters")
        latest = page.locator("tr", has=page.locator(".badge", has_text="latest"))
        if latest.count() and f"{job_id}-p01" in latest.first.inner_text():
            break
        assert time.monotonic() < deadline, page.inner_text("main")
        time.sleep(2)
    assert f"{job_id}-p00" in page.inner_text("main")
    _shot(page, shots, "06-adapters")

    # The newest version's model card, and the version downloaded as a zip.
    latest.first.get_by_role("link", name="Model card").click()
    page.wait_for_url(f"{url}/adapters/{book_id}/{job_id}-p01")
    card = page.inner_text("#model-card")
    assert "perplexity" in card.lower() and "<" not in card, card[:500]
    _shot(page, shots, "06b-model-card")
    with page.expect_download() as download:
        page.click("#download")
    assert download.value.suggested_filename == f"{book_id}-{job_id}-p01.zip"
    with zipfile.ZipFile(download.value.path()) as zf:
        names = {Path(n).name for n in zf.namelist()}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= names, names

    # Try it: base and tuned continuations streamed side by side, the exact versions named.
    page.goto(f"{url}/try?book={book_id}")
    page.fill("#prompt", "Robin Hood took his bow and")
    page.fill("#max_new_tokens", "16")
    page.click("#generate-button")
    page.wait_for_selector("body[data-generated=yes]", timeout=300_000)
    assert page.is_hidden("#try-error"), page.inner_text("#try-error")
    assert page.inner_text("#base-version") == "base"
    assert page.inner_text("#tuned-version") == f"{book_id}:{job_id}-p01"
    for side in ("base", "tuned"):
        text = page.inner_text(f"#{side}-text")
        assert text.startswith("Robin Hood took his bow and") and len(text) > len(
            "Robin Hood took his bow and"
        )
    _shot(page, shots, "07-try-it")

    # A hostile title renders as text and runs nothing.
    page.goto(f"{url}/books")
    page.set_input_files(
        "#file", {"name": "hostile.pdf", "mimeType": "application/pdf", "buffer": book_pdf(60, seed=43)}
    )
    page.fill("#title", HOSTILE)
    page.click("#upload-button")
    page.wait_for_url(f"{url}/books/*", timeout=300_000)
    assert page.inner_text("#book-title") == HOSTILE
    page.goto(f"{url}/books")
    assert HOSTILE in page.inner_text("main")
    assert page.evaluate("window.__pwned") is None
    _shot(page, shots, "08-books-hostile-title")

    # On a phone.
    phone = context.new_page()
    phone.set_viewport_size({"width": 390, "height": 844})
    phone.goto(f"{url}/jobs/{job_id}")
    phone.wait_for_selector("body[data-job-done=yes]")
    _shot(phone, shots, "09-phone-job")
    phone.close()

    # Log out: the pages ask for the token again.
    page.click("header .logout button")
    page.wait_for_url(f"{url}/login")
    page.goto(f"{url}/jobs/{job_id}")
    assert "/login?next=" in page.url
    context.close()
