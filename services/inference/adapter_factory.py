"""Train small, real PEFT LoRA adapters quickly — for tests and the benchmark.

Not the production trainer (that is ``novelcrafter.trainer``): a few optimizer steps of
causal-LM training on a text, enough to give each book an adapter whose output visibly
differs from the base model and from other books'.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def train_lora(
    base_model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    out_dir: Path,
    *,
    steps: int = 4,
    lr: float = 2e-3,
    seed: int = 0,
    rank: int = 8,
    alpha: int = 32,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    init_from: Path | None = None,
    max_length: int = 64,
) -> Path:
    """Train a LoRA on ``texts`` (on top of ``init_from`` if given) and save it to ``out_dir``.

    ``base_model`` (fp32) is wrapped for the duration and restored with ``unload()``, so one
    loaded copy can train many adapters; never pass a model that is serving requests.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(seed)
    if init_from is not None:
        model = PeftModel.from_pretrained(base_model, str(init_from), is_trainable=True)
    else:
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules=list(targets),
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base_model, config)
    try:
        ids = tokenizer("\n\n".join(texts))["input_ids"]
        windows = [ids[i : i + max_length] for i in range(0, max(1, len(ids) - 8), max_length)]
        windows = [w for w in windows if len(w) > 8] or [ids[:max_length]]
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        model.train()
        for step in range(steps):
            batch = torch.tensor([windows[step % len(windows)]])
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()
        out_dir = Path(out_dir)
        model.save_pretrained(str(out_dir))
    finally:
        model.unload()
        base_model.eval()
    return out_dir
