"""The web page served by the API at `/`, driven in a real headless Chromium (Debian's package, through
Playwright) against the real stack: upload, live progress, the table of images, failures, the download.
Chromium reaches 127.0.0.1 only: its background traffic is off (tests/support/chromium.py), and every
request the page makes is checked to go to loopback."""

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from playwright.sync_api import expect, sync_playwright

from deploy.local.services import REPO_ROOT
from services.api.app import create_app
from testbed.images import jpeg_bytes
from tests.support.api_server import ApiServer
from tests.support.chromium import OFFLINE_FLAGS, ensure_chromium
from tests.support.settings import service_env
from tests.support.stack import JOB_TIMEOUT, all_images, url_csv

# The README's screenshot: every run saves one in its temporary folder; UPDATE_SCREENSHOT=1 saves it
# over docs/web-page.png (ports and ids change each run, so a test run leaves the repository alone).
README_SCREENSHOT = REPO_ROOT / "docs" / "web-page.png"


@pytest.fixture(scope="module")
def browser():
    executable = ensure_chromium()
    with sync_playwright() as playwright:
        # launch() gives Chromium a new empty profile (--user-data-dir) of its own each time.
        browser = playwright.chromium.launch(executable_path=str(executable), args=OFFLINE_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh page; at the end, every URL it requested must have been on 127.0.0.1."""
    context = browser.new_context(accept_downloads=True, viewport={"width": 1200, "height": 800})
    requested = []
    context.on("request", lambda request: requested.append(request.url))
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()
    remote = [
        url for url in requested if urlparse(url).scheme in ("http", "https") and urlparse(url).hostname != "127.0.0.1"
    ]
    assert requested and not remote, remote


def drop_file(page, name: str, text: str) -> None:
    """Drop a file on the drop zone as a user dragging it from their desktop would."""
    transfer = page.evaluate_handle(
        "([name, text]) => { const t = new DataTransfer(); t.items.add(new File([text], name, {type: 'text/csv'})); return t; }",
        [name, text],
    )
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})


def test_upload_watch_the_job_and_download_its_output_csv(start_stack, image_host, receivers, page, tmp_path):
    stack = start_stack(processors=1)
    receiver = receivers()
    urls = [image_host.add(f"/photo{seed}.jpg", jpeg_bytes(640, 480, seed)) for seed in range(3)]
    urls.insert(2, image_host.base_url + "/missing.jpg")
    page.goto(stack.settings.public_base_url + "/")

    # A file that is not a CSV of image URLs, dropped on the page: the API's refusal is shown as is.
    drop_file(page, "notes.csv", "just,some\ncells,here\n")
    expect(page.locator("#drop-hint")).to_have_text("notes.csv")
    page.click("#upload-button")
    expect(page.locator("#error")).to_contain_text("invalid_csv (422):")
    expect(page.locator("#job")).to_be_hidden()

    csv_file = tmp_path / "products.csv"
    csv_file.write_text(url_csv(urls))
    page.set_input_files("#csv-file", str(csv_file))
    page.fill("#webhook-url", receiver.url)
    page.click("#upload-button")
    expect(page.locator("#job-status")).to_have_text("completed", timeout=JOB_TIMEOUT * 1000)
    expect(page.locator("#error")).to_be_hidden()

    request_id = page.locator("#request-id").inner_text()
    status, images = all_images(stack.api, request_id)
    assert status["counts"] == {"total": 4, "processed": 3, "failed": 1, "pending": 0}
    expect(page.locator("#counts")).to_contain_text("4 of 4 done: 3 processed, 1 failed, 0 pending")
    expect(page.locator("#dispatch")).to_have_text("4 released to the processors, 0 waiting")
    assert page.locator("#progress").evaluate("bar => [bar.value, bar.max]") == [4, 4]
    rows = page.locator("#images tbody tr")
    expect(rows).to_have_count(4)
    for index, image in enumerate(images):
        row = rows.nth(index)
        before, after = row.locator("td").nth(1), row.locator("td").nth(2)
        assert before.locator("img").get_attribute("src") == image["input_url"]
        if image["status"] == "failed":
            assert image["input_url"].endswith("/missing.jpg")
            expect(row.locator("td.status")).to_have_text("failed")
            expect(after.locator("code")).to_have_text("http_404")
            expect(after).to_contain_text(image["error"]["message"])
            expect(row.locator("td.saving")).to_have_text("")
        else:
            assert after.locator("img").get_attribute("src") == image["output_url"]
            saving = round((1 - image["bytes_out"] / image["bytes_in"]) * 100)
            assert saving > 0
            expect(row.locator("td.saving")).to_have_text(f"{saving} %")
    # The thumbnails are shown: the browser loaded the inputs and the outputs (served under /files/).
    page.wait_for_function(
        "() => [...document.querySelectorAll('tr.processed img')].every(img => img.complete && img.naturalWidth > 0)"
    )
    assert page.locator("tr.processed img").count() == 6
    expect(page.locator("#webhook")).to_contain_text("delivered", timeout=60_000)  # sent after completion

    with page.expect_download() as download_info:
        page.click("#download-button")
    download = download_info.value
    assert download.suggested_filename == f"{request_id}.csv"
    assert Path(download.path()).read_bytes() == stack.api.get(f"/output_csv/{request_id}").content
    assert "failed:http_404" in Path(download.path()).read_text()

    screenshot = README_SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") == "1" else tmp_path / "web-page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000


def test_with_api_keys_on_the_page_is_public_and_its_calls_carry_the_key_typed(
    make_settings, own_database, page, tmp_path
):
    settings = make_settings(database_url=own_database, api_keys_required=True)
    key = subprocess.run(
        [sys.executable, "-m", "services.api.keys", "create", "web-page"],
        env=service_env(settings),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    subprocess.run(
        [sys.executable, "-m", "services.api.keys", "set-limits", "web-page", "--uploads-per-minute", "1"],
        env=service_env(settings),
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=60,
        check=True,
    )
    csv_file = tmp_path / "job.csv"
    csv_file.write_text(url_csv(["https://127.0.0.1:9/a.jpg"]))
    with ApiServer(create_app(settings)) as server:
        page.goto(server.base_url + "/")
        page.set_input_files("#csv-file", str(csv_file))
        page.click("#upload-button")
        expect(page.locator("#error")).to_contain_text("unauthorized (401):")

        page.fill("#api-key", key)
        page.click("#upload-button")
        expect(page.locator("#request-id")).to_have_text(re.compile(r"^[0-9a-f-]{36}$"))
        expect(page.locator("#counts")).to_contain_text("of 1 done")  # a status answer, read with the key
        expect(page.locator("#error")).to_be_hidden()

        page.click("#upload-button")  # the key's second upload this minute, over its limit of 1
        expect(page.locator("#error")).to_contain_text("uploads_per_minute (429):")
        expect(page.locator("#error")).to_contain_text(re.compile(r"Try again in \d+ s\."))
