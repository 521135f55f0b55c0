"""The seeds' own client calls (tests/client_seeds), run unchanged but for the host, the
key and image URLs (to a loopback image server serving the documents' paths): FastDeploy's
cURL requests and Python client, ms-swift's openai clients, the PAI-EAS LLM document's
openai client.

FastDeploy's and swift's clients send no real key (`null`, `EMPTY`, or none): they run
against an API process with FERRY_AUTH=off. FastDeploy's run on the session stack, whose
default model is SmolLM2 (a request with images goes to the image model); swift's clients
use the first model `/v1/models` lists, as `swift deploy` serves one model: they run on a
deployment of their own serving the image model only. The EAS document's client sends its
service token: it runs against the session stack's ordinary API with a key.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from storage.repositories.jobs import new_job_id
from tests.conftest import KEY_A, VISION, Stack, open_own_stack
from tests.imaging import RecordingServer, Route, image_bytes

pytestmark = [pytest.mark.timeout(900), pytest.mark.engine]
SEEDS = Path(__file__).parent / "client_seeds"

FASTDEPLOY_HOST = "http://0.0.0.0:8180"
FASTDEPLOY_IMAGES = "https://paddlenlp.bj.bcebos.com"
FASTDEPLOY_IMAGE = "/datasets/paddlemix/demo_images/example2.jpg"
SWIFT_IMAGES = (
    "https://modelscope-open.oss-cn-hangzhou.aliyuncs.com",
    "http://modelscope-open.oss-cn-hangzhou.aliyuncs.com",
)
SWIFT_HOST = "http://localhost:8000/v1"
# The documents' images, each its own picture (so each has its own sha256).
PICTURES = {
    FASTDEPLOY_IMAGE: image_bytes("JPEG", (96, 64), (150, 110, 60)),
    "/images/rose.jpg": image_bytes("JPEG", (64, 64), (200, 20, 60)),
    "/images/cat.png": image_bytes("PNG", (48, 64), (120, 120, 120)),
    "/images/animal.png": image_bytes("PNG", (80, 48), (30, 160, 40)),
}


@pytest.fixture(scope="module")
def images() -> Iterator[RecordingServer]:
    """A loopback server holding the documents' images at the documents' paths."""
    server = RecordingServer()
    for path, data in PICTURES.items():
        mime = "image/jpeg" if path.endswith(".jpg") else "image/png"
        server.serve(path, Route(body=data, headers={"Content-Type": mime}))
    yield server
    server.close()


def seed_copy(name: str, tmp_path: Path, replacements: dict[str, str]) -> Path:
    """The seed's file with `replacements` made (each must occur), nothing else changed."""
    text = (SEEDS / name).read_text()
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text)
    return path


def run(command: list[str], cwd: Path, timeout: float = 600) -> str:
    done = subprocess.run(
        command,
        capture_output=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    out, err = done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
    assert done.returncode == 0, out + err
    return out


def new_jobs(stack: Stack, since: str) -> list[dict[str, Any]]:
    """Jobs created after the job id `since` (ids are time-ordered), oldest first."""
    url = stack.database_url.replace("postgresql+asyncpg://", "postgresql://")
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT id, model, status, request, result_text FROM jobs WHERE id > %s ORDER BY id",
            (since,),
        ).fetchall()
    return [
        dict(zip(("id", "model", "status", "request", "text"), row, strict=True)) for row in rows
    ]


def image_hashes(value: Any) -> list[str]:
    """The sha256 of every stored image reference in a job's request, in order."""
    if isinstance(value, dict):
        if isinstance(value.get("image"), dict) and "sha256" in value["image"]:
            return [value["image"]["sha256"]]
        return [h for item in value.values() for h in image_hashes(item)]
    if isinstance(value, list):
        return [h for item in value for h in image_hashes(item)]
    return []


def sha(path: str) -> str:
    return hashlib.sha256(PICTURES[path]).hexdigest()


# --- FastDeploy (004): cURL and the Python client ----------------------------------------


def fastdeploy_curl(
    name: str, url: str, images: RecordingServer, tmp_path: Path, **extra: str
) -> str:
    replacements = {FASTDEPLOY_HOST: url, **extra}
    if FASTDEPLOY_IMAGES in (SEEDS / name).read_text():
        replacements[FASTDEPLOY_IMAGES] = images.url("").rstrip("/")
    return run(["bash", str(seed_copy(name, tmp_path, replacements))], tmp_path)


def fastdeploy_chat(
    name: str,
    stack: Stack,
    url: str,
    images: RecordingServer,
    tmp_path: Path,
    model: str,
    **extra: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run a FastDeploy chat example: its answer, from `model`, and the one job it made,
    succeeded."""
    since = new_job_id()
    answer = json.loads(fastdeploy_curl(name, url, images, tmp_path, **extra))
    assert answer["object"] == "chat.completion", answer
    assert answer["model"] == model
    (job,) = new_jobs(stack, since)
    assert job["id"] == answer["id"] and job["status"] == "succeeded"
    return answer, job


def test_fastdeploy_health_check(open_api: str, tmp_path: Path, images: RecordingServer) -> None:
    out = fastdeploy_curl("fastdeploy_health.sh", open_api, images, tmp_path)
    assert out.startswith("HTTP/1.1 200"), out


def test_fastdeploy_curl_without_model_goes_to_the_default_model(
    stack: Stack, open_api: str, smol_model: str, tmp_path: Path, images: RecordingServer
) -> None:
    # As written the body's apostrophes end its single quotes: no shell runs it.
    verbatim = subprocess.run(
        ["bash", "-n", str(SEEDS / "fastdeploy_chat.sh")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verbatim.returncode != 0 and "unexpected EOF" in verbatim.stderr
    answer, job = fastdeploy_chat(
        "fastdeploy_chat.sh",
        stack,
        open_api,
        images,
        tmp_path,
        smol_model,
        **{"Li Bai's 'Quiet Night Thoughts' as": "Li Bai'\\''s '\\''Quiet Night Thoughts'\\'' as"},
    )
    assert answer["choices"][0]["message"]["content"] == job["text"] != ""
    user = job["request"]["messages"][0]["content"]
    assert user == "Rewrite Li Bai's 'Quiet Night Thoughts' as a modern poem"


def test_fastdeploy_curl_with_an_image_goes_to_the_image_model(
    stack: Stack,
    open_api: str,
    smol_model: str,
    vision_model: str,
    tmp_path: Path,
    images: RecordingServer,
) -> None:
    _, job = fastdeploy_chat(
        "fastdeploy_chat_image.sh", stack, open_api, images, tmp_path, vision_model
    )
    assert image_hashes(job["request"]) == [sha(FASTDEPLOY_IMAGE)]


def test_fastdeploy_curl_thinking_off_reaches_the_template(
    stack: Stack,
    open_api: str,
    smol_model: str,
    vision_model: str,
    tmp_path: Path,
    images: RecordingServer,
) -> None:
    answer, job = fastdeploy_chat(
        "fastdeploy_chat_no_thinking.sh", stack, open_api, images, tmp_path, vision_model
    )
    assert answer["choices"][0]["message"]["reasoning_content"] is None
    assert job["request"]["chat_template_kwargs"] == {"enable_thinking": False}


def test_fastdeploy_curl_with_a_video_is_a_400_naming_video(
    stack: Stack, open_api: str, smol_model: str, tmp_path: Path, images: RecordingServer
) -> None:
    since = new_job_id()
    out = fastdeploy_curl("fastdeploy_chat_video.sh", open_api, images, tmp_path)
    error = json.loads(out)["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "messages.0.content.0"
    assert "video" in error["message"], error
    assert new_jobs(stack, since) == []


def test_fastdeploy_python_client(
    stack: Stack,
    open_api: str,
    smol_model: str,
    vision_model: str,
    tmp_path: Path,
    images: RecordingServer,
) -> None:
    host, port = open_api.removeprefix("http://").split(":")
    path = seed_copy(
        "fastdeploy_client.py",
        tmp_path,
        {
            'host = "0.0.0.0"': f'host = "{host}"',
            'port = "8180"': f'port = "{port}"',
            FASTDEPLOY_IMAGES: images.url("").rstrip("/"),
        },
    )
    before = len([h for h in images.hits if h.path == FASTDEPLOY_IMAGE])
    since = new_job_id()
    out = run([sys.executable, str(path)], tmp_path)
    (job,) = new_jobs(stack, since)
    assert job["model"] == vision_model and job["status"] == "succeeded"
    assert image_hashes(job["request"]) == [sha(FASTDEPLOY_IMAGE)]
    assert len([h for h in images.hits if h.path == FASTDEPLOY_IMAGE]) == before + 1
    # The client prints each chunk's delta content: the answer (and None for a chunk
    # without content, such as the last one).
    assert job["text"] and job["text"] in out, (out, job["text"])


# --- ms-swift (003): the openai clients ---------------------------------------------------


@pytest.fixture(scope="module")
def swift(model_cache: Path, logs: Path, s3_url: str) -> Iterator[Stack]:
    """A deployment like `swift deploy`'s: one model (the image model), authentication
    off, image URLs on 127.0.0.1 allowed; on Redis database 5.

    The clients send no max_tokens, and the tiny model's random text rarely ends by
    itself: it would fill the context, and the follow-up turn that carries it would no
    longer fit. The operator's cap for such requests (FERRY_DEFAULT_MAX_TOKENS) keeps
    each answer short, as a real model's would be. Its own database: the session stack's
    dispatcher would otherwise release its jobs to the session stack's image worker."""
    with open_own_stack("ferry_test_swift", 5, model_cache, s3_url) as s:
        s.add_api(
            "api-swift",
            logs,
            FERRY_AUTH="off",
            FERRY_DEFAULT_MAX_TOKENS="64",
            FERRY_IMAGE_FETCH_ALLOW_NETWORKS="127.0.0.1/32",
        )
        s.add_worker("worker-swift-vision", VISION, "vllm", logs, model=VISION)
        yield s


def run_swift(
    name: str, stack: Stack, images: RecordingServer, tmp_path: Path
) -> tuple[str, list[dict[str, Any]]]:
    base = images.url("").rstrip("/")
    replacements = {SWIFT_HOST: f"{stack.url}/v1"}
    text = (SEEDS / name).read_text()
    for host in SWIFT_IMAGES:
        if host in text:
            replacements[host] = base
    path = seed_copy(name, tmp_path, replacements)
    since = new_job_id()
    out = run([sys.executable, str(path)], tmp_path)
    assert out.startswith(f"model_type: {VISION}\n"), out
    jobs = new_jobs(stack, since)
    assert [j["status"] for j in jobs] == ["succeeded", "succeeded"], jobs
    assert all(j["model"] == VISION for j in jobs)
    return out, jobs


def test_swift_qwen_vl_chat_img_tags_and_streaming(
    swift: Stack, images: RecordingServer, tmp_path: Path
) -> None:
    out, (first, second) = run_swift("swift_qwen_vl_chat.py", swift, images, tmp_path)
    rose = sha("/images/rose.jpg")
    # The streamed follow-up carries the first turn, its <img> tag included.
    assert image_hashes(first["request"]) == [rose]
    assert image_hashes(second["request"]) == [rose]
    assert first["request"]["seed"] == 42 and second["request"]["seed"] == 42
    assert second["request"]["messages"][1] == {"role": "assistant", "content": first["text"]}
    assert f"response: {first['text']}\n" in out
    assert "query: Box out the flowers in the picture.\nresponse: " in out


def test_swift_yi_vl_images_field(swift: Stack, images: RecordingServer, tmp_path: Path) -> None:
    out, (first, second) = run_swift("swift_yi_vl_6b_chat.py", swift, images, tmp_path)
    cat, animal = sha("/images/cat.png"), sha("/images/animal.png")
    assert image_hashes(first["request"]) == [cat]
    assert image_hashes(second["request"]) == [cat, animal]
    assert f"response: {first['text']}\n" in out


def test_swift_minicpm_images_field_greedy(
    swift: Stack, images: RecordingServer, tmp_path: Path
) -> None:
    out, (first, second) = run_swift("swift_minicpm_v_v2_5_chat.py", swift, images, tmp_path)
    cat = sha("/images/cat.png")
    assert image_hashes(first["request"]) == [cat]
    assert image_hashes(second["request"]) == [cat]
    assert first["request"]["temperature"] == 0 and second["request"]["temperature"] == 0
    assert f"response: {first['text']}\n" in out


def test_swift_qwen_vl_completions_with_img_tags(
    swift: Stack, images: RecordingServer, tmp_path: Path
) -> None:
    out, (first, second) = run_swift("swift_qwen_vl.py", swift, images, tmp_path)
    rose = sha("/images/rose.jpg")
    assert image_hashes(first["request"]) == [rose]
    assert image_hashes(second["request"]) == [rose]
    assert f"response: {first['text']}\n" in out
    assert len(re.findall(r"^query: Picture 1:<img>", out, re.MULTILINE)) == 2


# --- PAI-EAS, deploying an LLM (001): the vLLM deployment's openai client -----------------


def test_eas_llm_openai_client_with_max_completion_tokens_2048(
    stack: Stack, smol_model: str, tmp_path: Path
) -> None:
    path = seed_copy(
        "eas_llm_openai.py",
        tmp_path,
        {'"<EAS API KEY>"': repr(KEY_A), '"<EAS API Endpoint>/v1"': repr(f"{stack.url}/v1")},
    )
    since = new_job_id()
    out = run([sys.executable, str(path)], tmp_path)
    # It serves the first model listed: SmolLM2 sorts first on the session stack.
    assert out.startswith(f"{smol_model}\n"), out
    (job,) = new_jobs(stack, since)
    assert job["model"] == smol_model and job["status"] == "succeeded"
    assert job["request"]["max_tokens"] == 2048
    assert out.removeprefix(f"{smol_model}\n").startswith(job["text"]), (out, job["text"])
