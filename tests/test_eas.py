"""PAI-EAS compatibility: the seeds' own client snippets (tests/eas_seeds, only host and
token filled in) against a running Ferry, plus history and bad-input checks."""

from __future__ import annotations

import ast
import hashlib
import json
import re
import secrets
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import requests

from tests.conftest import KEY_A, KEY_B, Stack
from tests.eas_clients import (
    contents,
    import_seed,
    jobs_whose_prompt_has,
    latest_job_id,
    mllm_placeholders,
    run_seed,
    seed_copy,
)
from tests.helpers import assert_error
from tests.imaging import image_bytes

pytestmark = pytest.mark.timeout(600)


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
    seed.post_infer(
        prompt=first, chat_history=chat_history, use_stream=False, url=stack.url, headers=head
    )
    answer = json.loads(capsys.readouterr().out)
    reply = answer["response"]
    assert reply and answer["chat_history"] == [[first, reply]]
    assert ast.literal_eval(run_seed(get)) == [[first, reply]]

    # Streamed, with the history the client got back (the seed's flow): `process_stream`
    # prints exactly the answer, which is stored as the second turn.
    second = "And at night?"
    chat_history = json.loads(seed.post_get_history(url=stack.url, headers=head))["chat_history"]
    seed.post_infer(
        prompt=second, chat_history=chat_history, use_stream=True, url=stack.url, headers=head
    )
    printed = capsys.readouterr().out
    history = ast.literal_eval(run_seed(get))
    assert history == [[first, reply], [second, printed]]
    (request,) = [
        r for r in jobs_whose_prompt_has(stack, first) if r["messages"][-1]["content"] == second
    ]
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
    response = requests.post(
        f"{stack.url}/infer_forward",
        headers=head,
        timeout=120,
        json={"prompt": "Go on.", "chat_history": pairs, "max_output_tokens": 8},
    )
    assert response.status_code == 200, response.text
    reply = response.json()["response"]
    (request,) = jobs_whose_prompt_has(stack, marker)
    stored = requests.post(f"{stack.url}/get_history", headers=head, timeout=60).json()
    assert contents(request) == [
        ("user", pairs[0][0]),
        ("assistant", "Earlier answer."),
        ("user", "Go on."),
    ]
    assert request["max_tokens"] == 8
    # The caller's stored history records the turn (not the client's made-up past).
    assert stored == {"chat_history": [["Go on.", reply]]}
    assert response.json()["chat_history"] == [["Go on.", reply]]
    requests.post(f"{stack.url}/clear_history", headers=head, timeout=60)


def test_mllm_seed_main_describes_an_image(stack: Stack, vision_model: str, tmp_path: Path) -> None:
    png = image_bytes(size=(64, 48), color=(10, 120, 200))
    picture = tmp_path / "picture.png"
    picture.write_bytes(png)
    head = {"Authorization": KEY_B}
    requests.post(f"{stack.url}/clear_history", headers=head, timeout=60)
    # The seed's own main: its image path is one of the parameters it says to replace.
    seed = seed_copy(
        "mllm_infer.py",
        tmp_path,
        {**mllm_placeholders(stack, KEY_B), "'path_to_your_image'": repr(str(picture))},
    )
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
    follow_up = requests.post(
        f"{stack.url}/infer_forward",
        headers=head,
        timeout=120,
        json={"prompt": "What colour is it?", "max_output_tokens": 8},
    )
    assert follow_up.status_code == 200, follow_up.text
    url = stack.database_url.replace("postgresql+asyncpg://", "postgresql://")
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT request, model FROM jobs WHERE id = %s", (follow_up.headers["x-ferry-job-id"],)
        ).fetchone()
    assert row is not None
    request, model = row
    assert model == vision_model
    assert request["messages"][0]["content"] == [
        {
            "type": "image",
            "image": {"sha256": image["sha256"], "mime": "image/png", "width": 64, "height": 48},
        },
        {"type": "text", "text": "Please describe the image"},
    ]
    assert request["messages"][1:] == [
        {"role": "assistant", "content": answer["response"]},
        {"role": "user", "content": "What colour is it?"},
    ]
    requests.post(f"{stack.url}/clear_history", headers=head, timeout=60)


# --- PAI-EAS "Transformers standard": POST / ---------------------------------------------


def test_transformers_seed_client_non_streaming(stack: Stack, tmp_path: Path) -> None:
    path = seed_copy(
        "llm_http.py",
        tmp_path,
        {
            '"<Public access address of the EAS service>"': repr(stack.url),
            '"<Public token of the EAS service>"': repr(KEY_A),
        },
    )
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
    path = seed_copy(
        "llm_http_stream.py",
        tmp_path,
        {
            'host = ""': f"host = {stack.url!r}",
            'authorization = ""': f"authorization = {KEY_A!r}",
        },
    )
    prompt = f"Stream please {secrets.token_hex(3)}"
    out = run_seed(path, "--prompt", prompt, "--max-new-tokens", "48")
    lines = re.findall(
        r" --- stream line: (.*?) \n --- history: (.*?)\n(?= --- stream|\Z)", out, re.DOTALL
    )
    assert len(lines) > 1, out
    pieces = [piece for piece, _ in lines]
    histories = [ast.literal_eval(h) for _, h in lines]
    answer = "".join(pieces)
    assert histories[-1][-1] == [prompt, answer]
    assert histories[-1][0][0] == "San Francisco is a"
    # Each object's history holds the answer so far.
    assert [h[-1][1] for h in histories] == ["".join(pieces[: i + 1]) for i in range(len(lines))]
    (request,) = jobs_whose_prompt_has(stack, prompt)
    assert request["messages"][0]["role"] == "system"
    assert request["max_tokens"] == 48 and request["top_k"] == 4


def test_transformers_plain_text_body_like_curl(stack: Stack) -> None:
    response = requests.post(
        stack.url,
        data=b"what is the capital of Canada?\n",
        headers={"Authorization": KEY_A},
        timeout=120,
    )
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
        llm = client.post("/", json={"prompt": "Hi", "history": history, "use_stream_chat": False})
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
        not_json = client.post(
            "/", content=b"{nope", headers={**auth, "Content-Type": "application/json"}
        )
        not_object = client.post("/", json=[1, 2], headers=auth)
        empty = client.post("/", content=b"  \n", headers=auth)
        bad_knob = client.post("/", json={"prompt": "Hi", "temperature": 5}, headers=auth)
        bad_image = client.post(
            "/infer_forward", json={"prompt": "Hi", "image": "bm90IGFu"}, headers=auth
        )
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
