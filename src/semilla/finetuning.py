"""LoRA fine-tuning: a checkpoint's model frozen, a low-rank adapter trained on chats or text.

It is the training loop of `semilla train` (train.setup -> fit) with `lora_r` set: held-out
split, loss on assistant turns, early stopping, metrics.jsonl, TensorBoard and --resume all
come with it. The output directory is the run directory and the adapter at once: its top holds
the best adapter as a PEFT directory (adapter_config.json + adapter_model.safetensors), last/
the resumable one.
"""

from __future__ import annotations

import os
from typing import Any

from semilla.config import TrainConfig
from semilla.errors import ConfigError
from semilla.models.lora import AdapterError, LoraConfig


def finetune(
    checkpoint: str | os.PathLike,
    data: str,
    out: str | os.PathLike,
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.05,
    target_modules: str = "q_proj,v_proj",
    resume: bool = False,
    overwrite: bool = False,
    **train_settings: Any,
) -> dict[str, Any]:
    """Train a LoRA adapter for `checkpoint` on `data` (chat JSONL, text, or a prepared dataset)
    into the PEFT directory `out`; returns the final metrics with "adapter": out.

    train_settings are TrainConfig fields (max_iters, learning_rate, eval_interval,
    early_stopping_patience, ...). `resume` continues the run in `out`; a new run where one
    exists needs `overwrite`."""
    from semilla.train import train
    from semilla.train_inputs import init_model_config
    from semilla.train_setup import resume_configs

    try:
        LoraConfig(lora_r, lora_alpha, lora_dropout, target_modules)
    except AdapterError as e:
        raise ConfigError(str(e)) from None
    lora = dict(
        lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules
    )
    if resume:
        model_cfg, train_cfg = resume_configs(str(out), train_settings)
        if not train_cfg.lora_r:
            raise ConfigError(
                f"{out} is a run of semilla train, not a LoRA fine-tune: resume it with semilla train"
            )
        result = train(model_cfg, train_cfg, resume=str(out))
    else:
        train_cfg = TrainConfig(
            **{**train_settings, **lora, "data": data, "out_dir": str(out), "init_from": str(checkpoint)}
        )
        problems = train_cfg.problems()
        if problems:
            raise ConfigError("invalid configuration: " + "; ".join(problems))
        result = train(init_model_config(str(checkpoint), {}), train_cfg, overwrite=overwrite)
    return {**result, "adapter": str(out)}
