"""The seeds' clients, unchanged, on real API processes: the completions route and batch
lines without `model`, FastDeploy's client with authentication off (and its warning), and
`enable_thinking` both ways. The rest of routing runs on the API in process
(tests/test_model_routing_api.py).

Routing is checked on real API processes over real Redis/PostgreSQL/S3 with models
announced in the registry and no worker behind them: a job is stored (202) with the model
it resolved to, which is all routing decides. Thinking runs a real worker on a copy of the
tiny chat model whose chat template shows `enable_thinking` in the prompt."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from ferry_testing.procs import start_api
from storage.content import split_reasoning
from storage.keys import MODELS_HASH
from storage.registry import ServedModel, WorkerBeat, now_epoch
from storage.registry import announce as announce_model
from tests.conftest import KEY_A, TINY, Stack, open_stack
from tests.helpers import assert_error, read_events
from tests.routing import HUB_ID, TEXT_A, TEXT_B, VISION, chat
from worker.models.tiny import ensure_tiny_model

pytestmark = pytest.mark.timeout(900)

THINK = "think-tiny"


def announce(stack: Stack, model: ServedModel) -> None:
    """As its worker would, with a live worker (no process: no job here is answered, but a
    synchronous request must not wait for a worker, FERRY_SYNC_WAIT_SECONDS)."""
    beat = WorkerBeat(f"announced-{model.name}", model.name, model.engine, 0, time.time())
    announce_model(stack.redis(), model, worker=beat)


class Routing:
    """One deployment, three API processes: keys and no default (`url`), a default model
    (`default_url`), and authentication off (`open_url`, default model too)."""

    def __init__(self, stack: Stack, default_url: str, open_url: str, open_log: Path) -> None:
        self.stack = stack
        self.url = stack.url
        self.default_url = default_url
        self.open_url = open_url
        self.open_log = open_log

    def client(self, url: str | None = None, key: str | None = KEY_A) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        return httpx.Client(base_url=url or self.url, timeout=60, headers=headers)


@pytest.fixture(scope="module")
def routing(own_database: str, model_cache: Path, logs: Path, s3_url: str) -> Iterator[Routing]:
    with open_stack(own_database, 8, model_cache, s3_url) as stack:
        for name in (TEXT_A, TEXT_B, HUB_ID):
            announce(stack, ServedModel(name, 2048, "vllm", created=now_epoch()))
        announce(
            stack, ServedModel(VISION, 2048, "vllm", supports_images=True, created=now_epoch())
        )
        stack.add_api("routing-keys", logs)
        default_env = {**stack.env, "FERRY_DEFAULT_MODEL": TEXT_B}
        proc, default_url = start_api("routing-default", default_env, logs)
        stack.procs.append(proc)
        open_env = {**default_env, "FERRY_AUTH": "off"}
        proc, open_url = start_api("routing-open", open_env, logs)
        stack.procs.append(proc)
        yield Routing(stack, default_url, open_url, proc.log_path)


def submitted_model(client: httpx.Client, body: dict[str, Any], route: str = "/v1/jobs") -> str:
    """The model a stored job went to, as its row says."""
    response = client.post(route, json=body)
    assert response.status_code == 202, response.text
    job = client.get(f"/v1/jobs/{response.json()['id']}").json()
    model: str = job["model"]
    return model


# --- which model --------------------------------------------------------------------


def test_completions_route_the_same_way(routing: Routing) -> None:
    with routing.client(routing.default_url) as client:
        # Streamed: the job id comes in the headers (no worker: the stream never ends).
        with client.stream(
            "POST", "/v1/completions", json={"prompt": "Once", "max_tokens": 2, "stream": True}
        ) as response:
            assert response.status_code == 200
            job_id = response.headers["X-Ferry-Job-Id"]
        assert client.get(f"/v1/jobs/{job_id}").json()["model"] == TEXT_B
    with routing.client() as client:
        error = assert_error(
            client.post("/v1/completions", json={"prompt": "Once"}), 400, "model_required"
        )
    assert f"`{TEXT_A}`" in error["message"]


def test_batch_lines_without_model_go_to_the_default(routing: Routing) -> None:
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": chat(**extra),
        }
        for i, extra in enumerate([{}, {"model": "null"}])
    ]
    data = "\n".join(json.dumps(line) for line in lines).encode()
    sdk = openai.OpenAI(base_url=f"{routing.default_url}/v1", api_key=KEY_A, max_retries=0)
    file_id = sdk.files.create(file=("in.jsonl", data, "application/jsonl"), purpose="batch").id
    batch = sdk.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    jobs: list[dict[str, Any]] = []
    with routing.client(routing.default_url) as client:
        deadline = time.monotonic() + 60
        while len(jobs) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            jobs = client.get("/v1/jobs", params={"batch_id": batch.id}).json()["data"]
    assert sorted(j["custom_id"] for j in jobs) == ["r0", "r1"]
    assert {j["model"] for j in jobs} == {TEXT_B}


# --- authentication off ------------------------------------------------------------


def test_auth_off_serves_fastdeploys_client_and_warns(routing: Routing) -> None:
    # FastDeploy's Python client: api_key="null", model="null".
    client = openai.OpenAI(base_url=f"{routing.open_url}/v1", api_key="null", max_retries=0)
    assert client.models.retrieve(TEXT_B).id == TEXT_B
    with routing.client(routing.open_url, key="null") as raw:
        assert submitted_model(raw, chat(model="null")) == TEXT_B
    log = routing.open_log.read_text(errors="replace")
    assert "Authentication is OFF" in log


# --- thinking ------------------------------------------------------------------------

THINK_PREFIX = (
    "{%- if enable_thinking is defined -%}"
    "{%- if enable_thinking -%}THINKING ON{%- else -%}"
    "THINKING OFF: answer at once, with no reasoning at all, none whatsoever.{%- endif -%}"
    "{%- endif -%}"
)


def thinking_model_dir(model_cache: Path, out: Path) -> Path:
    """A copy of the tiny chat model whose chat template writes what `enable_thinking`
    says into the prompt (nothing when it is not given)."""
    shutil.copytree(ensure_tiny_model(TINY, model_cache), out)
    jinja = out / "chat_template.jinja"
    if jinja.exists():
        jinja.write_text(THINK_PREFIX + jinja.read_text())
    else:
        config_path = out / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = THINK_PREFIX + config["chat_template"]
        config_path.write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def think_model(
    routing: Routing, model_cache: Path, logs: Path, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """A transformers worker on that copy, announced with vLLM's `deepseek_r1` reasoning
    parser where the worker has the setting."""
    path = thinking_model_dir(model_cache, tmp_path_factory.mktemp("think") / "model")
    stack = routing.stack
    stack.env["FERRY_REASONING_PARSER"] = "deepseek_r1"
    try:
        stack.add_worker("worker-think", THINK, "transformers", logs, model=str(path))
    finally:
        del stack.env["FERRY_REASONING_PARSER"]
    return THINK


def prompt_tokens(client: httpx.Client, **flags: Any) -> int:
    response = client.post(
        "/v1/chat/completions", json=chat(model=THINK, temperature=0, max_tokens=1, **flags)
    )
    assert response.status_code == 200, response.text
    tokens: int = response.json()["usage"]["prompt_tokens"]
    return tokens


def test_enable_thinking_true_and_false_reach_the_template(
    routing: Routing, think_model: str
) -> None:
    with routing.client() as client:
        plain = prompt_tokens(client)
        on = prompt_tokens(client, chat_template_kwargs={"enable_thinking": True})
        off = prompt_tokens(client, chat_template_kwargs={"enable_thinking": False})
        # FastDeploy's way, in `metadata`.
        meta_on = prompt_tokens(client, metadata={"enable_thinking": True})
        meta_off = prompt_tokens(client, metadata={"enable_thinking": False})
    assert plain < on < off
    assert (meta_on, meta_off) == (on, off)


def raw_text(client: httpx.Client, job_id: str) -> str:
    """The reply as the worker produced it, from the job's own events."""
    return "".join(e.data["text"] for e in read_events(client, job_id) if e.type == "delta")


def test_reasoning_is_split_by_default_for_a_model_with_a_reasoning_parser(
    routing: Routing, think_model: str
) -> None:
    announced = ServedModel.from_json(routing.stack.redis().hget(MODELS_HASH, THINK) or b"{}")
    if announced.reasoning_parser is None:
        pytest.skip("this worker does not announce reasoning parsers (FERRY_REASONING_PARSER)")
    body = chat("Think first.", model=THINK, temperature=0, max_tokens=8, ignore_eos=True)
    with routing.client() as client:
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        message = response.json()["choices"][0]["message"]
        job_id = response.json()["id"]
        raw = raw_text(client, job_id)
        result = client.get(f"/v1/jobs/{job_id}").json()["result"]
        # Thinking off: no split; the reply is all content.
        off = client.post(
            "/v1/chat/completions",
            json={**body, "chat_template_kwargs": {"enable_thinking": False}},
        ).json()
    # The template may have opened `<think>` in the prompt: a reply with no `</think>` yet
    # is all reasoning, as vLLM's parsers read it.
    expected = split_reasoning(raw, "parser")
    assert "</think>" not in raw and expected == (raw.strip("\n") or None, "")
    assert (message["reasoning_content"], message["content"]) == expected
    assert (result["reasoning_content"], result["text"]) == expected
    assert off["choices"][0]["message"]["reasoning_content"] is None
    assert off["choices"][0]["message"]["content"]
    stream = openai.OpenAI(base_url=f"{routing.url}/v1", api_key=KEY_A, max_retries=0)
    reasoning = content = ""
    sdk_body = {k: v for k, v in body.items() if k != "ignore_eos"}
    for c in stream.chat.completions.create(
        stream=True, extra_body={"ignore_eos": True}, **sdk_body
    ):
        if c.choices:
            delta: Any = c.choices[0].delta
            content += delta.content or ""
            reasoning += getattr(delta, "reasoning_content", None) or ""
    assert (reasoning or None, content) == expected
