"""PAI-EAS compatibility: the seeds' own client snippets (tests/eas_seeds, only host and
token filled in) against a running Ferry, plus history and bad-input checks."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import psycopg
import pytest
import requests
import websocket

from tests.conftest import KEY_A, KEY_B, Stack
from tests.helpers import assert_error
from tests.imaging import image_bytes

pytestmark = pytest.mark.timeout(600)
SEEDS = Path(__file__).parent / "eas_seeds"


def seed_copy(name: str, tmp_path: Path, placeholders: dict[str, str]) -> Path:
    """The seed's file with its host/token placeholders filled in, nothing else changed."""
    text = (SEEDS / name).read_text()
    for placeholder, value in placeholders.items():
        assert placeholder in text, placeholder
        text = text.replace(placeholder, value)
    path = tmp_path / name
    path.write_text(text)
    return path


def run_seed(path: Path, *args: str, timeout: float = 300) -> str:
    """Run the seed as a script; what it printed (no newline translation: the tiny
    model's random text may hold a carriage return)."""
    done = subprocess.run([sys.executable, str(path), *args], capture_output=True,
                          timeout=timeout, cwd=path.parent,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, out + err
    return out


def import_seed(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"seed_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mllm_placeholders(stack: Stack, key: str) -> dict[str, str]:
    return {"'<service_url>'": repr(stack.url), "'<token>'": repr(key)}


def jobs_whose_prompt_has(stack: Stack, text: str) -> list[dict[str, Any]]:
    """Stored requests (oldest first) of jobs whose prompt contains `text`."""
    url = stack.database_url.replace("postgresql+asyncpg://", "postgresql://")
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT request FROM jobs WHERE request::text LIKE %s ORDER BY id",
                            (f"%{text}%",)).fetchall()
    return [row[0] for row in rows]


def contents(request: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(m["role"], m["content"]) for m in request["messages"]]


def latest_job_id(stack: Stack, key: str) -> str | None:
    with stack.client(key) as client:
        first: str | None = client.get("/v1/jobs", params={"limit": 1}).json()["first_id"]
    return first


# --- PAI-EAS MLLM: /infer_forward, /get_history, /clear_history --------------------------


def test_mllm_seed_client_keeps_history_in_the_default_conversation(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill = mllm_placeholders(stack, KEY_A)
    clear = seed_copy("mllm_clear_history.py", tmp_path, fill)
    get = seed_copy("mllm_get_history.py", tmp_path, fill)
    seed = import_seed(seed_copy("mllm_infer.py", tmp_path, fill))
    head = {"Authorization": KEY_A}

    assert run_seed(clear) == "success\n"
    assert run_seed(get) == "[]\n"

    first = f"Describe a sunset {secrets.token_hex(3)}."
    chat_history = json.loads(seed.post_get_history(url=stack.url, headers=head))["chat_history"]
    seed.post_infer(prompt=first, chat_history=chat_history, use_stream=False, url=stack.url,
                    headers=head)
    answer = json.loads(capsys.readouterr().out)
    reply = answer["response"]
    assert reply and answer["chat_history"] == [[first, reply]]
    assert ast.literal_eval(run_seed(get)) == [[first, reply]]

    # Streamed, with the history the client got back (the seed's flow): `process_stream`
    # prints exactly the answer, which is stored as the second turn.
    second = "And at night?"
    chat_history = json.loads(seed.post_get_history(url=stack.url, headers=head))["chat_history"]
    seed.post_infer(prompt=second, chat_history=chat_history, use_stream=True, url=stack.url,
                    headers=head)
    printed = capsys.readouterr().out
    history = ast.literal_eval(run_seed(get))
    assert history == [[first, reply], [second, printed]]
    (request,) = [r for r in jobs_whose_prompt_has(stack, first)
                  if r["messages"][-1]["content"] == second]
    assert contents(request) == [("user", first), ("assistant", reply), ("user", second)]

    with stack.client(KEY_A) as client:
        listed = client.get("/v1/conversations", params={"limit": 100}).json()["data"]
        (default,) = [c for c in listed if c["default"]]
        stored = client.get(f"/v1/conversations/{default['id']}").json()["messages"]
    assert [m["content"] for m in stored] == [first, reply, second, printed]

    assert run_seed(clear) == "success\n"
    assert run_seed(get) == "[]\n"


def test_mllm_history_sent_by_the_client_replaces_the_stored_one(stack: Stack) -> None:
    marker = secrets.token_hex(4)
    head = {"Authorization": KEY_A}
    requests.post(f"{stack.url}/clear_history", headers=head, timeout=60)
    pairs = [[f"Earlier question {marker}?", "Earlier answer."]]
    response = requests.post(f"{stack.url}/infer_forward", headers=head, timeout=120, json={
        "prompt": "Go on.", "chat_history": pairs, "max_output_tokens": 8})
    assert response.status_code == 200, response.text
    reply = response.json()["response"]
    (request,) = jobs_whose_prompt_has(stack, marker)
    stored = requests.post(f"{stack.url}/get_history", headers=head, timeout=60).json()
    assert contents(request) == [("user", pairs[0][0]), ("assistant", "Earlier answer."),
                                 ("user", "Go on.")]
    assert request["max_tokens"] == 8
    # The caller's stored history records the turn (not the client's made-up past).
    assert stored == {"chat_history": [["Go on.", reply]]}
    assert response.json()["chat_history"] == [["Go on.", reply]]
    requests.post(f"{stack.url}/clear_history", headers=head, timeout=60)


def test_mllm_seed_main_describes_an_image(
    stack: Stack, vision_model: str, tmp_path: Path
) -> None:
    png = image_bytes(size=(64, 48), color=(10, 120, 200))
    picture = tmp_path / "picture.png"
    picture.write_bytes(png)
    head = {"Authorization": KEY_B}
    requests.post(f"{stack.url}/clear_history", headers=head, timeout=60)
    # The seed's own main: its image path is one of the parameters it says to replace.
    seed = seed_copy("mllm_infer.py", tmp_path, {**mllm_placeholders(stack, KEY_B),
                                                 "'path_to_your_image'": repr(str(picture))})
    answer = json.loads(run_seed(seed))
    assert answer["chat_history"] == [["Please describe the image", answer["response"]]]

    with stack.client(KEY_B) as client:
        listed = client.get("/v1/conversations", params={"limit": 100}).json()["data"]
        (default,) = [c for c in listed if c["default"]]
        messages = client.get(f"/v1/conversations/{default['id']}").json()["messages"]
        (image,) = messages[0]["images"]
        served = client.get(image["url"])
    assert image["sha256"] == hashlib.sha256(png).hexdigest()
    assert (image["width"], image["height"], image["mime"]) == (64, 48, "image/png")
    assert image["url"] == f"{stack.url}/v1/images/{image['sha256']}"
    assert served.status_code == 200 and served.content == png
    assert messages[1]["images"] == [] and messages[1]["content"] == answer["response"]

    # A text-only follow-up: the stored image comes back into its prompt, so the model
    # that takes images answers it.
    follow_up = requests.post(f"{stack.url}/infer_forward", headers=head, timeout=120,
                              json={"prompt": "What colour is it?", "max_output_tokens": 8})
    assert follow_up.status_code == 200, follow_up.text
    url = stack.database_url.replace("postgresql+asyncpg://", "postgresql://")
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT request, model FROM jobs WHERE id = %s",
                           (follow_up.headers["x-ferry-job-id"],)).fetchone()
    assert row is not None
    request, model = row
    assert model == vision_model
    assert request["messages"][0]["content"] == [
        {"type": "image", "image": {"sha256": image["sha256"], "mime": "image/png",
                                    "width": 64, "height": 48}},
        {"type": "text", "text": "Please describe the image"}]
    assert request["messages"][1:] == [
        {"role": "assistant", "content": answer["response"]},
        {"role": "user", "content": "What colour is it?"}]
    requests.post(f"{stack.url}/clear_history", headers=head, timeout=60)


# --- PAI-EAS "Transformers standard": POST / ---------------------------------------------


def test_transformers_seed_client_non_streaming(stack: Stack, tmp_path: Path) -> None:
    path = seed_copy("llm_http.py", tmp_path, {
        '"<Public access address of the EAS service>"': repr(stack.url),
        '"<Public token of the EAS service>"': repr(KEY_A),
    })
    # The seed's defaults: max_new_tokens=2048, more than the tiny model's context leaves.
    out = run_seed(path)
    match = re.search(r" --- output: (.*) \n --- history: (.*)\n\Z", out, re.DOTALL)
    assert match, out
    output, history = match.group(1), ast.literal_eval(match.group(2))
    assert out.startswith("Prompt: 'How can I get there?'")
    assert output
    assert history[0][0] == "San Francisco is a"
    assert history[-1] == ["How can I get there?", output]


def test_transformers_seed_client_streaming(stack: Stack, tmp_path: Path) -> None:
    path = seed_copy("llm_http_stream.py", tmp_path, {
        'host = ""': f"host = {stack.url!r}",
        'authorization = ""': f"authorization = {KEY_A!r}",
    })
    prompt = f"Stream please {secrets.token_hex(3)}"
    out = run_seed(path, "--prompt", prompt, "--max-new-tokens", "48")
    lines = re.findall(r" --- stream line: (.*?) \n --- history: (.*?)\n(?= --- stream|\Z)",
                       out, re.DOTALL)
    assert len(lines) > 1, out
    pieces = [piece for piece, _ in lines]
    histories = [ast.literal_eval(h) for _, h in lines]
    answer = "".join(pieces)
    assert histories[-1][-1] == [prompt, answer]
    assert histories[-1][0][0] == "San Francisco is a"
    # Each object's history holds the answer so far.
    assert [h[-1][1] for h in histories] == ["".join(pieces[:i + 1]) for i in range(len(lines))]
    (request,) = jobs_whose_prompt_has(stack, prompt)
    assert request["messages"][0]["role"] == "system"
    assert request["max_tokens"] == 48 and request["top_k"] == 4


def test_transformers_plain_text_body_like_curl(stack: Stack) -> None:
    response = requests.post(stack.url, data=b"what is the capital of Canada?\n",
                             headers={"Authorization": KEY_A}, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["response"]
    assert body["history"] == [["what is the capital of Canada?", body["response"]]]


BAD_HISTORIES = [
    ("not a list", "chat_history", "got str"),
    ([["only one"]], "chat_history.0", "item 0"),
    ([["a", 2]], "chat_history.0", "item 0"),
    (["a", "b"], "chat_history.0", "item 0"),
    ([["a", "b"], ["x", "y", "z"]], "chat_history.1", "item 1"),
]


@pytest.mark.parametrize(("history", "param", "names"), BAD_HISTORIES)
def test_bad_history_is_a_400_and_creates_nothing(
    stack: Stack, history: Any, param: str, names: str
) -> None:
    before = latest_job_id(stack, KEY_B)
    with stack.client(KEY_B) as client:
        conversations_before = client.get("/v1/conversations?limit=100").json()["data"]
        mllm = client.post("/infer_forward", json={"prompt": "Hi", "chat_history": history})
        llm = client.post("/", json={"prompt": "Hi", "history": history,
                                     "use_stream_chat": False})
        conversations_after = client.get("/v1/conversations?limit=100").json()["data"]
    for response, name in ((mllm, "chat_history"), (llm, "history")):
        error = assert_error(response, 400)
        assert error["param"] == param.replace("chat_history", name)
        assert "[user, assistant] pairs" in error["message"] and names in error["message"]
    assert latest_job_id(stack, KEY_B) == before
    assert conversations_after == conversations_before  # no default conversation either


def test_other_bad_requests(stack: Stack) -> None:
    before = latest_job_id(stack, KEY_B)
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        no_key = client.post("/", content=b"hello")
        wrong_key = client.post("/get_history", headers={"Authorization": "sk-wrong"})
        auth = {"Authorization": KEY_B}
        not_json = client.post("/", content=b"{nope",
                               headers={**auth, "Content-Type": "application/json"})
        not_object = client.post("/", json=[1, 2], headers=auth)
        empty = client.post("/", content=b"  \n", headers=auth)
        bad_knob = client.post("/", json={"prompt": "Hi", "temperature": 5}, headers=auth)
        bad_image = client.post("/infer_forward", json={"prompt": "Hi", "image": "bm90IGFu"},
                                headers=auth)
        # The bare token works on every route, Bearer on the EAS ones too.
        bare_on_v1 = client.get("/v1/jobs", headers=auth)
        bearer_on_eas = client.post("/get_history", headers={"Authorization": f"Bearer {KEY_B}"})
    assert_error(no_key, 401)
    assert_error(wrong_key, 401)
    assert assert_error(not_json, 400)["message"] == "Request body is not valid JSON."
    assert_error(not_object, 400)
    assert assert_error(empty, 400)["param"] == "prompt"
    assert assert_error(bad_knob, 400)["param"] == "temperature"
    # The session stack serves a text-only model: an image is refused before it is stored.
    assert assert_error(bad_image, 400)["param"] == "image"
    assert latest_job_id(stack, KEY_B) == before
    assert bare_on_v1.status_code == 200 and bearer_on_eas.status_code == 200


# --- PAI-EAS "Transformers standard": WebSocket ------------------------------------------


def ws_url(stack: Stack) -> str:
    return stack.url.replace("http://", "ws://")


def ws_round(ws: websocket.WebSocket, request: dict[str, Any] | str) -> list[str]:
    """Send one request; the messages that answer it: up to (not with) `<EOS>` when
    streamed, the one message otherwise."""
    ws.send(request if isinstance(request, str) else json.dumps(request))
    if isinstance(request, dict) and request.get("use_stream_chat") is False:
        return [ws.recv()]
    received = []
    while (message := ws.recv()) != "<EOS>":
        received.append(message)
    return received


def test_websocket_rounds_keep_history(stack: Stack) -> None:
    marker = secrets.token_hex(4)
    ws = websocket.create_connection(ws_url(stack), header=[f"Authorization: {KEY_A}"],
                                     timeout=120)
    try:
        first = ws_round(ws, {"prompt": f"alpha {marker}", "max_new_tokens": 8,
                              "system_prompt": "Be brief."})
        second = ws_round(ws, {"prompt": f"beta {marker}", "max_new_tokens": 8,
                               "use_stream_chat": False})
        bad = ws_round(ws, {"prompt": "x", "history": "nope"})
        bad_unstreamed = ws_round(ws, {"temperature": 9, "use_stream_chat": False})
        third = ws_round(ws, f"gamma {marker}")  # plain text is a prompt
        replaced = ws_round(ws, {"prompt": f"delta {marker}", "max_new_tokens": 4,
                                 "history": [["q", "a"]]})
    finally:
        ws.close()
    assert len(first) >= 1 and len(second) == 1 and third and replaced
    error = json.loads(bad[0])["error"]
    assert len(bad) == 1 and error["param"] == "history"
    assert json.loads(bad_unstreamed[0])["error"]["param"] == "temperature"
    requests_ = {r["messages"][-1]["content"]: r for r in jobs_whose_prompt_has(stack, marker)}
    answer1, answer2 = "".join(first), second[0]
    assert contents(requests_[f"alpha {marker}"]) == [
        ("system", "Be brief."), ("user", f"alpha {marker}")]
    # The system prompt belongs to the message that sent it; the history stays.
    assert contents(requests_[f"beta {marker}"]) == [
        ("user", f"alpha {marker}"), ("assistant", answer1), ("user", f"beta {marker}")]
    assert contents(requests_[f"gamma {marker}"]) == [
        ("user", f"alpha {marker}"), ("assistant", answer1), ("user", f"beta {marker}"),
        ("assistant", answer2), ("user", f"gamma {marker}")]
    assert contents(requests_[f"delta {marker}"]) == [
        ("user", "q"), ("assistant", "a"), ("user", f"delta {marker}")]


def test_websocket_keeps_reading_while_queued_rounds_wait(stack: Stack) -> None:
    """A client that sends several rounds at once (as PAI-EAS's llm_websocket.py does) is
    still read during the first round: a ping sent then is answered before that round ends.
    (uvicorn stops reading while a message waits for the app, and drops a connection whose
    keepalive pong it cannot read.) The rounds are answered in order."""
    ws = websocket.create_connection(ws_url(stack), header=[f"Authorization: {KEY_A}"],
                                     timeout=120)
    try:
        long_round = {"prompt": "one", "max_new_tokens": 300, "do_sample": False}
        ws.send(json.dumps(long_round))
        ws.send(json.dumps({"prompt": "two", "max_new_tokens": 2}))
        first = ws.recv()  # round one is streaming
        ws.ping("mid-round")
        frames = []
        while True:
            opcode, data = ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_PONG:
                break
            frames.append(data.decode())
        assert "<EOS>" not in frames, "the ping was only answered after the round ended"
        rest = []
        while (message := ws.recv()) != "<EOS>":
            rest.append(message)
        second = []
        while (message := ws.recv()) != "<EOS>":
            second.append(message)
    finally:
        ws.close()
    assert first and second  # both rounds answered, the second after the first's <EOS>


def test_websocket_refuses_a_wrong_key(stack: Stack) -> None:
    with pytest.raises(websocket.WebSocketBadStatusException):
        websocket.create_connection(ws_url(stack), header=["Authorization: sk-wrong"],
                                    timeout=30)


def test_websocket_seed_client(stack: Stack, tmp_path: Path) -> None:
    path = seed_copy("llm_websocket.py", tmp_path, {
        'authorization = ""': f"authorization = {KEY_A!r}",
        'host = "ws://" + ""': f"host = \"ws://\" + {stack.url.removeprefix('http://')!r}",
    })
    out = run_seed(path, timeout=560)
    # websocket-client >= 1.9 reports even a normal close (code 1000) through on_error.
    # 15 processes share one stdout and print() writes its pieces separately, so lines can
    # interleave: count the error reports and the normal-close texts instead of lines.
    normal = "Connection closed normally (code 1000)"
    # Once (in four full runs on 2026-11-22) a client's own close frame, sent after it had received
    # `<EOS>`, hit `[Errno 32] Broken pipe` with every round already answered; the cause was
    # not found (no error in the API log). Any other error report fails the test.
    broken_pipe = "[Errno 32] Broken pipe"
    assert out.count("error happened:") == out.count(normal) + out.count(broken_pipe), out
    assert out.count("receives end message: <EOS>") == 5  # on_message_1, 5 runs
    assert out.count("--- message received: <EOS>") == 25  # on_message_2: 5 rounds x 5
    assert out.count("### closed ###") == 15
