"""The chat page in a real Chromium, against a real Ferry (the session stack: API
processes, vLLM workers serving SmolLM2-135M-Instruct and the tiny image model, PostgreSQL,
Redis, moto S3). Each step leaves a screenshot under the test's temporary folder."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import KEY_A, SMOL, Stack
from tests.fixtures.browser import Watch
from tests.helpers import chat_body, read_events, submit, text_of, wait_job
from tests.imaging import image_bytes
from tests.ui_page import CuttableProxy, FerryPage, stored_job

pytestmark = pytest.mark.timeout(600)

STORY = "Tell me a long story about a lighthouse keeper and his cat."


def test_a_message_streams_then_ends_as_the_stored_result(ui: FerryPage, stack: Stack) -> None:
    ui.watch.shot("signed-in")
    ui.choose(model=SMOL, temperature=0, max_tokens=48)
    ui.record_growth()
    ui.send("What is the capital of France?")
    reply = ui.wait_end()
    ui.watch.shot("answered")

    assert reply.state == "done"
    with stack.client() as client:
        job = stored_job(client, reply.job_id)
    assert job["status"] == "succeeded" and job["model"] == SMOL
    assert reply.text == job["result"]["text"]
    assert "Paris" in reply.text
    assert "Paris" in reply.locator.locator(".content").inner_text()
    # It grew on the screen: frames showed partial replies before the whole one.
    partial = {n for n in ui.growth() if 0 < n < len(reply.text)}
    assert len(partial) >= 2, ui.growth()
    usage = reply.locator.locator(".usage").inner_text()
    assert f"{job['usage']['completion_tokens']} tokens" in usage and "tokens/s" in usage
    assert "first token" in usage
    # The user's turn is shown as sent, and the input is cleared for the next one.
    assert ui.page.locator('[data-role="user"]').last.inner_text() == (
        "What is the capital of France?"
    )
    assert ui.page.get_by_label("Message").input_value() == ""


def test_a_reload_mid_answer_carries_on_without_gap_or_repeat(ui: FerryPage, stack: Stack) -> None:
    ui.choose(model=SMOL, temperature=0, max_tokens=400)
    ui.send(STORY)
    before = ui.wait_for_text(40)
    job_id = ui.last_reply().get_attribute("data-job-id") or ""
    ui.watch.shot("before-reload")
    reloaded_at = time.time()
    ui.page.reload()

    # The same reply is back at once, from what the page kept, and goes on from there.
    restored = ui.wait_for_text(len(before))
    assert ui.last_reply().get_attribute("data-job-id") == job_id
    assert restored.startswith(before)
    ui.watch.shot("after-reload")
    reply = ui.wait_end()
    ui.watch.shot("finished-after-reload")

    assert reply.state == "done" and reply.job_id == job_id
    with stack.client() as client:
        job = stored_job(client, job_id)
    assert reply.text == job["result"]["text"]
    assert reply.text.startswith(restored) and len(reply.text) > len(restored)
    # The job was still streaming at the reload, and the page resumed after the last event
    # it had, not from the start.
    assert job["finished_at"] > reloaded_at
    resumed = [h for h in ui.events_requests(job_id) if h.get("last-event-id")]
    assert resumed, ui.events_requests(job_id)
    assert len(ui.page.locator('[data-role="assistant"]').all()) == 1


def test_a_reload_as_the_answer_ends_shows_it_ended(ui: FerryPage, stack: Stack) -> None:
    # The page kept the whole reply and the id of its last event (the terminal one) just
    # before the reload: nothing follows that id, and the page must still learn that the
    # job has ended (the API closes such a stream with a terminal event from SQL).
    with stack.client() as client:
        job = submit(client, chat_body(SMOL, "What is the capital of France?", max_tokens=24))
        stored = wait_job(client, job["id"])
        events = read_events(client, job["id"])
    kept = {
        "jobId": job["id"],
        "conversationId": None,
        "model": SMOL,
        "user": "What is the capital of France?",
        "images": 0,
        "text": text_of(events),
        "lastEventId": events[-1].id,
    }
    ui.page.evaluate(
        "(kept) => sessionStorage.setItem('ferry.inflight', JSON.stringify(kept))", kept
    )
    ui.page.reload()
    reply = ui.wait_end(timeout=15)
    assert reply.state == "done" and reply.job_id == job["id"]
    assert reply.text == stored["result"]["text"]
    assert ui.page.get_by_role("button", name="Send").is_enabled()


def test_a_dropped_connection_resumes_where_it_stopped(
    stack: Stack, smol_model: str, watch: Watch
) -> None:
    proxy = CuttableProxy(stack.url)
    try:
        ui = FerryPage(watch, proxy.url)
        ui.open()
        ui.sign_in(KEY_A)
        ui.choose(model=SMOL, temperature=0, max_tokens=400)
        ui.send(STORY)
        ui.wait_for_text(20)
        proxy.cut()
        status = ui.page.locator("#stream-status")
        status.get_by_text("reconnecting").wait_for()
        ui.watch.shot("connection-lost")
        time.sleep(2)
        proxy.restore()
        reply = ui.wait_end()
        ui.watch.shot("resumed")
    finally:
        proxy.close()

    assert reply.state == "done"
    with stack.client() as client:
        job = stored_job(client, reply.job_id)
    assert reply.text == job["result"]["text"]
    assert any(h.get("last-event-id") for h in ui.events_requests(reply.job_id))
    ui.assert_key_private(KEY_A)


def test_stop_ends_the_reply_and_cancels_the_job(ui: FerryPage, stack: Stack) -> None:
    ui.choose(model=SMOL, temperature=0, max_tokens=400)
    ui.send(STORY)
    ui.wait_for_text(10)
    ui.page.get_by_role("button", name="Stop").click()
    reply = ui.wait_end()
    ui.watch.shot("stopped")

    assert reply.state == "cancelled"
    assert reply.locator.get_by_text("Stopped.").is_visible()
    with stack.client() as client:
        job = stored_job(client, reply.job_id)
    assert job["status"] == "cancelled"
    assert job["usage"] is None or job["usage"]["completion_tokens"] < 400
    assert ui.page.get_by_role("button", name="Send").is_enabled()
    assert ui.page.get_by_role("button", name="Stop").is_disabled()


def test_an_image_gets_an_answer_and_its_conversation_survives_a_reload(
    vision_model: str, ui: FerryPage, stack: Stack, tmp_path: Path
) -> None:
    picture = tmp_path / "red.png"
    picture.write_bytes(image_bytes("PNG", (64, 48)))
    ui.choose(model=vision_model, temperature=0, max_tokens=16)
    with ui.page.expect_file_chooser() as chooser:
        ui.page.get_by_text("Attach image", exact=True).click()
    chooser.value.set_files(str(picture))
    thumb = ui.page.locator("#attachments img")
    thumb.wait_for()
    ui.watch.shot("image-attached")
    ui.send("What is in the picture?")
    reply = ui.wait_end()
    ui.watch.shot("image-answered")

    assert reply.state == "done"
    with stack.client() as client:
        job = stored_job(client, reply.job_id)
    assert job["model"] == vision_model and job["status"] == "succeeded"
    assert reply.text == job["result"]["text"]
    assert ui.page.locator("#attachments img").count() == 0
    conversation_id = job["conversation_id"]
    assert conversation_id

    ui.page.reload()
    entry = ui.page.locator(f'#conversations li[data-id="{conversation_id}"]')
    entry.get_by_role("button", name="What is in the picture?", exact=True).click()
    user = ui.page.locator('[data-role="user"]').last
    user.get_by_text("What is in the picture?").wait_for()
    image = user.locator("img")
    ui.page.wait_for_function(
        "(img) => img.complete && img.naturalWidth === 64 && img.naturalHeight === 48",
        arg=image.element_handle(),
    )
    assert ui.last_reply().get_attribute("data-text") == job["result"]["text"]
    ui.watch.shot("conversation-after-reload")
