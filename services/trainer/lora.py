"""Attach a LoRA adapter to the cached base model for one part, and take it off again.

The worker keeps only the base model in memory between parts: ``attach`` wraps it
(fresh LoRA from the job's config, or the previous part's adapter loaded trainable),
``detach`` unloads the LoRA layers so the next part starts from the pristine base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from novelcrafter.train_settings import LoraSettings


def attach(base_model: Any, lora: LoraSettings, init_adapter_dir: Path | None = None) -> Any:
    """A trainable PeftModel on ``base_model`` (modified in place until :func:`detach`).

    The caller seeds torch first: a fresh LoRA's A matrices are drawn from its RNG.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    base_model.config.use_cache = False  # training: no KV cache (and packed masks need none)
    if init_adapter_dir is not None:
        # The previous part's config wins: continuing an adapter must keep its shape.
        model = PeftModel.from_pretrained(base_model, str(init_adapter_dir), is_trainable=True)
    else:
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            bias=lora.bias,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base_model, config)
    return model


def detach(model: Any) -> Any:
    """Remove the LoRA layers (unmerged) and return the untouched base model in eval mode."""
    base = model.unload() if hasattr(model, "unload") else model
    if hasattr(base, "peft_config"):
        del base.peft_config
    base.config.use_cache = True
    base.eval()
    for param in base.parameters():
        param.requires_grad_(False)
    return base


def load_trainable_state(model: Any, state: dict[str, Any]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"adapter state has unexpected keys: {unexpected[:5]}")
