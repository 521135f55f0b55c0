"""A model directory that needs its own code (`auto_map`), built offline from the tiny chat
model: a config and a model class of their own, defined in python files beside the
weights, as hub models such as Qwen-VL and MiniCPM-V ship them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

_CONFIG_PY = """from transformers import Qwen2Config


class FerryRemoteConfig(Qwen2Config):
    model_type = "ferry_remote_qwen2"
"""

_MODELING_PY = """from transformers import Qwen2ForCausalLM

from .configuration_ferry import FerryRemoteConfig


class FerryRemoteForCausalLM(Qwen2ForCausalLM):
    config_class = FerryRemoteConfig
"""


def build_remote_code_model(tiny_chat_dir: Path, out: Path) -> Path:
    """A copy of the tiny (Qwen2-shaped) chat model whose config names a model type only its
    own python files define (so loading its config runs them)."""
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(tiny_chat_dir, tmp)
    (tmp / "configuration_ferry.py").write_text(_CONFIG_PY)
    (tmp / "modeling_ferry.py").write_text(_MODELING_PY)
    config = json.loads((tmp / "config.json").read_text())
    config.update(
        model_type="ferry_remote_qwen2",
        # vLLM builds the architecture it knows from the model's own config class, as it
        # does for MiniCPM-V or Qwen-VL; transformers takes the class from auto_map.
        architectures=["Qwen2ForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_ferry.FerryRemoteConfig",
            "AutoModelForCausalLM": "modeling_ferry.FerryRemoteForCausalLM",
        },
    )
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(out)
    return out
