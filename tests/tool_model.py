"""A model directory for tool calls, built offline from the tiny chat model.

A random-weight model cannot be asked to call a tool, so this copy is built to make one
observable and forceable:
- its chat template renders `tools`, an assistant turn's `tool_calls` and `tool` answers
  the way Hermes/Qwen2.5 templates do (the shape vLLM's `hermes` parser reads);
- its vocabulary has one more token whose text is a whole Hermes tool call,
  `TOOL_CALL_TEXT`: `logit_bias` {its id: 100} with `max_tokens` 1 makes the model emit
  exactly that text, which the worker's parser must turn into `tool_calls`. The token is
  a special one, as `<tool_call>` is in some Hermes models: its text is only there for
  the parser when the worker keeps special tokens, as vLLM's hermes parser asks
  (`adjust_request`).
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any

TOOL_CALL_TEXT = (
    'Checking. <tool_call>\n{"name": "get_weather", "arguments": '
    '{"city": "Paris", "unit": "celsius"}}\n</tool_call>'
)

HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools><|im_end|>\n"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{%- if message.content %}{{ message.content }}{%- endif %}"
    '{%- for call in message.tool_calls %}\n<tool_call>\n{"name": "'
    '{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}'
    "\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ message.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}

# A tool round trip in OpenAI's shape: the call, then its result.
HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "content": "18 degrees, sunny", "tool_call_id": "call_1"},
]


def build_tool_model(tiny_chat_dir: Path, out: Path) -> Path:
    """The tiny chat model with the Hermes-style template and the tool-call token (see the
    module doc); its id is in `tool_token_id(out)`."""
    if (out / "config.json").is_file():
        return out
    tf: Any = importlib.import_module("transformers")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_chat_dir)
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    tokenizer.add_tokens([TOOL_CALL_TEXT], special_tokens=True)
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    tokenizer.chat_template = HERMES_TEMPLATE
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # A template file beside the tokenizer would win over tokenizer_config's: write it.
    (tmp / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    (tmp / "tool-token.json").write_text(
        json.dumps({"id": tokenizer.convert_tokens_to_ids(TOOL_CALL_TEXT), "text": TOOL_CALL_TEXT})
    )
    tmp.rename(out)
    return out


def tool_token_id(model_dir: Path) -> int:
    return int(json.loads((model_dir / "tool-token.json").read_text())["id"])
