"""LoRA adapters built offline with `peft`, for tests: an adapter whose B matrices are
random (peft starts them at zero, which would change nothing), so its answers differ from
the base model's."""

from __future__ import annotations

from pathlib import Path


def build_lora_adapter(
    model_dir: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    rank: int = 8,
    scale: float = 0.05,
    image_text: bool = False,
) -> Path:
    """Save a LoRA adapter (q_proj/v_proj, rank `rank`) for the model in `model_dir` to
    `out`; its base (`base_model_name_or_path`) is `model_dir`. `image_text`: an image+text
    model, whose language model's layers are adapted."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    out = Path(out)
    if (out / "adapter_config.json").is_file():
        return out
    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if image_text else AutoModelForCausalLM
    model = auto.from_pretrained(str(model_dir), dtype=torch.float32)
    targets: str | list[str] = ["q_proj", "v_proj"]
    if image_text:
        targets = r".*text_model.*\.(q_proj|v_proj)"
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, scale)
    tmp = out.with_name(out.name + ".tmp")
    peft_model.save_pretrained(str(tmp))
    tmp.rename(out)
    return out
