"""The tiny chat model's builder (worker/models/tiny.py), built offline into a temporary
directory: cached, shared by concurrent callers, reproducible, with a working tokenizer
and chat template."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from worker.models import tiny
from worker.models.tiny import ensure_tiny_model, is_tiny_model

# The engine tests' marks, as when these lived with them: a build from scratch takes tens
# of seconds, too slow for the fast tier.
pytestmark = [pytest.mark.timeout(600), pytest.mark.engine]

TINY = "ferry-tiny-chat"


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def model_dir(model_cache: Path) -> Path:
    return ensure_tiny_model(TINY, model_cache)


# --- the builder -----------------------------------------------------------------------


def test_builder_reuses_cache(model_cache: Path, model_dir: Path, monkeypatch: Any) -> None:
    stamp = model_dir / tiny.STAMP_FILE
    before = stamp.stat().st_mtime_ns

    def must_not_build(out: Path) -> None:
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setitem(tiny.TINY_MODELS, TINY, must_not_build)
    assert ensure_tiny_model(TINY, model_cache) == model_dir
    assert stamp.stat().st_mtime_ns == before
    assert is_tiny_model(TINY) and not is_tiny_model("Qwen/Qwen2-0.5B")
    with pytest.raises(ValueError):
        ensure_tiny_model("no-such-model", model_cache)


def test_builder_concurrent_callers_share_one_build(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(ensure_tiny_model(TINY, tmp_path))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    # Only the final directory (and the lock file) remain: no temporary build left over.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".{results[0].name}.lock",
        results[0].name,
    ]


def test_builder_is_reproducible(model_dir: Path, tmp_path: Path) -> None:
    again = ensure_tiny_model(TINY, tmp_path)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_tokenizer_and_chat_template(model_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    tok: Any = AutoTokenizer.from_pretrained(model_dir)
    for text in ("Hello, world!", "  two  spaces\nand lines", "Über café 東京 ✓ 12345"):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.eos_token == "<|im_end|>"
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Again"}]},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nAgain<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(messages[:2], tokenize=False)
    assert not no_prompt.endswith("<|im_start|>assistant\n")
    config = AutoConfig.from_pretrained(model_dir)
    assert config.head_dim == 64 and config.vocab_size == len(tok)
    assert config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert "processor_class" not in tok_config
    gen_config = json.loads((model_dir / "generation_config.json").read_text())
    assert gen_config["eos_token_id"] == config.eos_token_id
