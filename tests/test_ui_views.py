"""The page's other views and its guards, in a real Chromium against the session stack:
jobs, batches, markup that must stay text, keys, authentication off, a phone-sized
screen with the keyboard alone, and what bad input gets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import Page, Route

from tests.batching import chat_line, jsonl
from tests.conftest import SMOL, TINY, Stack
from tests.fixtures.browser import Watch
from tests.helpers import chat_body, submit, wait_job
from tests.imaging import image_bytes
from tests.ui_page import FerryPage, stored_job

pytestmark = pytest.mark.timeout(600)

MARKUP = "<script>alert(1)</script> <img src=x onerror=alert(2)>"
# axe-core's rules for WCAG 2.1 A and AA, and its best practices.
AXE_RULES = {
    "runOnly": {
        "type": "tag",
        "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"],
    }
}


def accessibility_problems(page: Page) -> list[str]:
    """What axe-core finds on the page as it is now, one line per rule broken."""
    found = Axe().run(page, options=AXE_RULES).response["violations"]
    return [f"{v['id']}: {v['help']} at {[n['target'] for n in v['nodes']]}" for v in found]


def test_jobs_are_listed_watched_and_cancelled(ui: FerryPage, stack: Stack) -> None:
    with stack.client() as client:
        done = submit(
            client, chat_body(SMOL, "What is the capital of France?", max_tokens=24, temperature=0)
        )
        finished = wait_job(client, done["id"])
        running = submit(client, chat_body(SMOL, "Tell me a long story.", max_tokens=400))
    page = ui.page
    page.get_by_role("button", name="Jobs").click()
    row = page.locator(f'tr[data-job-id="{running["id"]}"]')
    row.wait_for()
    row.get_by_role("button", name="Open").click()
    output = page.locator("#job-detail-body")
    page.wait_for_function("(el) => el.innerText.length > 20", arg=output.element_handle())
    ui.watch.shot("job-streaming")
    page.locator("#job-detail").get_by_role("button", name="Cancel job").click()
    row.get_by_text("cancelled").wait_for()
    with stack.client() as client:
        assert stored_job(client, running["id"])["status"] == "cancelled"

    page.locator(f'tr[data-job-id="{done["id"]}"]').get_by_role("button", name="Open").click()
    page.locator("#job-detail-meta").get_by_text("succeeded").wait_for()
    assert "Paris" in output.inner_text()
    assert finished["result"]["text"].split()[0] in output.inner_text()
    ui.watch.shot("job-finished")


def test_a_batch_uploads_runs_to_100_percent_and_both_files_download(
    ui: FerryPage, stack: Stack, tmp_path: Path
) -> None:
    good = [chat_line(f"line-{i}", f"Say {i}.", model=TINY, max_tokens=6) for i in range(3)]
    bad = chat_line("no-model", model="no-such-model")
    source = tmp_path / "requests.jsonl"
    source.write_bytes(jsonl([*good, bad]))
    page = ui.page
    page.get_by_role("button", name="Batches").click()
    page.wait_for_load_state("networkidle")
    earlier = set(
        page.locator("li.batch").evaluate_all("(items) => items.map(i => i.dataset.batchId)")
    )
    page.get_by_label("Batch file (JSONL)").set_input_files(str(source))
    page.get_by_role("button", name="Start batch").click()
    page.wait_for_function(
        "(n) => document.querySelectorAll('li.batch').length > n", arg=len(earlier)
    )
    batch_id = page.locator("li.batch").first.get_attribute("data-batch-id")
    assert batch_id not in earlier
    batch = page.locator(f'li.batch[data-batch-id="{batch_id}"]')
    page.locator(f'li.batch[data-batch-id="{batch_id}"][data-status="completed"]').wait_for(
        timeout=240_000
    )
    progress = batch.locator("progress")
    assert progress.get_attribute("value") == progress.get_attribute("max") == "4"
    assert "100% · 3 completed, 1 failed of 4" in batch.inner_text()
    ui.watch.shot("batch-done")

    with page.expect_download() as output:
        batch.get_by_role("button", name="Download output").click()
    lines = [json.loads(x) for x in Path(output.value.path()).read_text().splitlines()]
    assert [x["custom_id"] for x in lines] == ["line-0", "line-1", "line-2"]
    assert all(x["response"]["status_code"] == 200 for x in lines)
    with page.expect_download() as errors:
        batch.get_by_role("button", name="Download errors").click()
    failed = [json.loads(x) for x in Path(errors.value.path()).read_text().splitlines()]
    assert [(x["custom_id"], x["error"]["code"]) for x in failed] == [
        ("no-model", "model_not_found")
    ]


def test_a_file_that_is_not_jsonl_is_refused_before_upload(ui: FerryPage, tmp_path: Path) -> None:
    source = tmp_path / "table.csv"
    source.write_text('{"custom_id": "a", "url": "/v1/chat/completions", "body": {}}\na,b,c\n')
    page = ui.page
    page.get_by_role("button", name="Batches").click()
    chooser = page.get_by_label("Batch file (JSONL)")
    chooser.set_input_files(str(source))
    page.get_by_role("button", name="Start batch").click()
    message = page.locator("#batch-error")
    message.get_by_text("table.csv, line 2 is not JSON").wait_for()
    ui.watch.shot("batch-not-jsonl")
    # Nothing went out, and the file is still chosen for a retry.
    assert not [r for r in ui.watch.requests if r.url.endswith("/v1/files")]
    assert chooser.evaluate("(input) => input.files.length") == 1


def test_markup_in_a_message_and_in_a_model_reply_renders_as_text(
    ui: FerryPage, stack: Stack
) -> None:
    ui.choose(model=SMOL, temperature=0, max_tokens=8)
    ui.send("<img src=x onerror=alert(1)>")
    first = ui.wait_end()
    user = ui.page.locator('[data-role="user"]').last
    assert user.inner_text() == "<img src=x onerror=alert(1)>"
    assert user.locator("img").count() == 0
    # A real model reply holding markup: structured output makes SmolLM2 write it.
    with stack.client() as client:
        conversation = stored_job(client, first.job_id)["conversation_id"]
        schema = {"type": "string", "enum": [MARKUP]}
        job = submit(
            client,
            chat_body(
                SMOL,
                "Say it.",
                max_tokens=64,
                conversation_id=conversation,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "markup", "schema": schema},
                },
            ),
        )
        reply = wait_job(client, job["id"])["result"]["text"]
    assert MARKUP in reply
    ui.page.reload()
    ui.page.locator(f'#conversations li[data-id="{conversation}"] .open').click()
    shown = ui.page.locator(f'[data-role="assistant"][data-job-id="{job["id"]}"]')
    shown.wait_for()
    assert MARKUP in shown.inner_text()
    assert shown.locator("script, img").count() == 0
    ui.page.get_by_role("button", name="Jobs").click()
    ui.page.locator(f'tr[data-job-id="{job["id"]}"]').get_by_role("button", name="Open").click()
    detail = ui.page.locator("#job-detail-body")
    detail.get_by_text("<script>alert(1)</script>", exact=False).wait_for()
    assert detail.locator("script, img").count() == 0
    ui.watch.shot("markup-as-text")


def test_conversations_start_new_and_delete_from_the_sidebar(ui: FerryPage, stack: Stack) -> None:
    ui.choose(model=SMOL, temperature=0, max_tokens=8)
    ui.send("Name a colour.")
    first = ui.wait_end()
    ui.page.get_by_role("button", name="New chat").click()
    assert ui.page.locator("#messages > *").count() == 0
    assert ui.page.locator("#chat-title").inner_text() == "New chat"
    ui.send("Name a fruit.")
    second = ui.wait_end()
    with stack.client() as client:
        kept = stored_job(client, second.job_id)["conversation_id"]
        gone = stored_job(client, first.job_id)["conversation_id"]
    assert kept != gone
    entry = ui.page.locator(f'#conversations li[data-id="{gone}"]')
    delete = entry.get_by_role("button", name=re.compile("^Delete conversation"))
    delete.click()
    assert delete.inner_text() == "Confirm delete"  # a second press deletes: no dialog
    delete.click()
    entry.wait_for(state="detached")
    ui.watch.shot("conversation-deleted")
    with stack.client() as client:
        assert client.get(f"/v1/conversations/{gone}").status_code == 404
        assert client.get(f"/v1/conversations/{kept}").status_code == 200


def test_every_view_passes_an_accessibility_audit(ui: FerryPage, stack: Stack) -> None:
    page = ui.page
    ui.choose(model=SMOL, temperature=0, max_tokens=24)  # the settings open, as a person has them
    ui.send("What is the capital of France?")
    reply = ui.wait_end()
    assert accessibility_problems(page) == []
    page.get_by_role("button", name="Jobs").click()
    job = page.locator(f'tr[data-job-id="{reply.job_id}"]')
    job.get_by_role("button", name="Open").click()
    page.locator("#job-detail-meta").get_by_text("succeeded").wait_for()
    assert accessibility_problems(page) == []
    page.get_by_role("button", name="Batches").click()
    page.wait_for_load_state("networkidle")
    assert accessibility_problems(page) == []
    page.set_viewport_size({"width": 375, "height": 740})
    page.get_by_role("button", name="Chat").click()
    assert accessibility_problems(page) == []


def test_a_wrong_key_gets_a_clear_message(stack: Stack, watch: Watch) -> None:
    page = FerryPage(watch, stack.url)
    page.open()
    wrong = "sk-wrong-key-for-the-test"
    page.page.get_by_label("API key").fill(wrong)
    page.page.get_by_role("button", name="Sign in").click()
    error = page.page.locator("#signin-error")
    error.get_by_text("not accepted (401)").wait_for()
    watch.shot("wrong-key")
    assert accessibility_problems(page.page) == []
    assert page.page.get_by_label("API key").is_visible()
    assert not page.page.get_by_role("button", name="Send").is_visible()
    page.assert_key_private(wrong)


def test_with_authentication_off_there_is_nothing_to_type(
    open_api: str, smol_model: str, watch: Watch
) -> None:
    page = FerryPage(watch, open_api)
    page.open()
    page.page.get_by_role("button", name="Send").wait_for()
    assert not page.page.get_by_label("API key").is_visible()
    page.choose(temperature=0, max_tokens=24)  # model left to the server: SmolLM2
    page.send("What is the capital of France?")
    reply = page.wait_end()
    assert reply.state == "done" and "Paris" in reply.text
    watch.shot("auth-off")


def test_a_phone_sized_screen_with_the_keyboard_alone(ui: FerryPage) -> None:
    ui.choose(model=SMOL, temperature=0, max_tokens=24)
    page = ui.page
    page.set_viewport_size({"width": 375, "height": 740})
    page.reload()
    box = page.get_by_label("Message")
    box.wait_for()
    # Signed in, the focus is in the message box: type, Shift+Enter, Enter.
    page.wait_for_function("() => document.activeElement.id === 'message'")
    page.keyboard.type("What is the capital")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("of France?")
    assert box.input_value() == "What is the capital\nof France?"
    assert page.locator('[data-role="user"]').count() == 0
    page.keyboard.press("Enter")
    reply = ui.wait_end()
    assert reply.state == "done"
    reached = []
    page.get_by_label("Message").focus()
    for _ in range(6):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("() => document.activeElement.id"))
    assert "attach" in reached and "send" in reached
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
    ui.watch.shot("phone")


def test_bad_images_are_refused_on_the_page(ui: FerryPage, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    big = tmp_path / "huge.png"
    big.write_bytes(b"\x89PNG" + b"\0" * (11 * 1024 * 1024))
    ui.page.get_by_label("Message").fill("Look at this")
    ui.page.get_by_label("Attach image").set_input_files([str(text), str(big)])
    error = ui.page.locator("#composer-error")
    error.get_by_text('"notes.txt" is not an image.').wait_for()
    assert '"huge.png" is larger than 10 MB.' in error.inner_text()
    assert ui.page.locator("#attachments img").count() == 0
    assert ui.page.get_by_label("Message").input_value() == "Look at this"
    ui.watch.shot("bad-images")


# A PNG dropped onto the page or pasted into it, as the browser hands it over: a DataTransfer.
HAND_OVER = """([kind, bytes]) => {
  const data = new DataTransfer();
  data.items.add(new File([new Uint8Array(bytes)], `${kind}.png`, { type: "image/png" }));
  const target = document.getElementById(kind === "dropped" ? "view-chat" : "message");
  const event = kind === "dropped"
    ? new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true })
    : new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true });
  target.dispatchEvent(event);
}"""


def test_images_can_be_dropped_or_pasted(ui: FerryPage) -> None:
    png = list(image_bytes("PNG", (20, 10)))
    for kind in ("dropped", "pasted"):
        ui.page.evaluate(HAND_OVER, [kind, png])
        ui.page.locator(f'#attachments img[alt="{kind}.png"]').wait_for()
    assert ui.page.locator("#attachments img").count() == 2
    assert accessibility_problems(ui.page) == []
    ui.watch.shot("dropped-and-pasted")
    ui.page.get_by_role("button", name="Remove dropped.png").click()
    assert ui.page.locator("#attachments img").count() == 1


@pytest.mark.parametrize(
    ("status", "headers", "shown"),
    [
        (429, {"Retry-After": "7"}, "Too many requests (429): try again in 7 s"),
        (503, {"Retry-After": "2"}, "Ferry had a problem (503), try again in 2 s"),
    ],
)
def test_an_api_refusal_keeps_the_message_for_a_retry(
    ui: FerryPage, stack: Stack, status: int, headers: dict[str, str], shown: str
) -> None:
    # Ferry sends neither answer on demand: the browser's network answers this once, the
    # way a proxy or an overloaded API would, and the retry goes to the real API.
    def refuse(route: Route) -> None:
        body = {"error": {"message": "Slow down.", "type": "server_error"}}
        route.fulfill(status=status, headers=headers, json=body)

    ui.page.route("**/v1/jobs", refuse, times=1)
    ui.choose(model=SMOL, temperature=0, max_tokens=24)
    ui.send("What is the capital of France?")
    error = ui.page.locator("#composer-error")
    error.get_by_text(shown).wait_for()
    ui.watch.shot(f"refused-{status}")
    assert ui.page.get_by_label("Message").input_value() == "What is the capital of France?"
    assert ui.page.locator('[data-role="user"]').count() == 0
    ui.page.get_by_role("button", name="Send").click()
    reply = ui.wait_end()
    assert reply.state == "done" and "Paris" in reply.text
