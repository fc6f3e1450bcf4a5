"""Supervised fine-tuning (Study B's SFT arm): TRL's SFTTrainer with a peft LoRA adapter.

Loss is on response tokens only (TRL's prompt–completion format), the model's own chat template frames
every example, and an adapter checkpoint is written after every epoch so each epoch can be evaluated.
Per-step `train_loss`, `learning_rate` and `grad_norm` (and per-epoch `eval_loss`) go to the fine-tune run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from harness.config import TrainConfig
from harness.data import FinetuneRow
from harness.errors import HarnessError
from harness.loss_classes import ClassCollator, ClassLossMixin, class_dataset, pad_token_id
from tracking import RunHandle


@dataclass(frozen=True)
class EpochCheckpoint:
    """An adapter saved at the end of an epoch."""

    epoch: int
    step: int
    path: Path


def user_message(row: FinetuneRow) -> str:
    """The user turn: the instruction, followed by its input when there is one (Alpaca/Dolly style)."""
    return f"{row.instruction}\n\n{row.input}" if row.input else row.instruction


class ClassLossSFTTrainer(ClassLossMixin, SFTTrainer):
    """TRL's SFTTrainer that also logs the format and content token losses of every step (issue 10)."""


class TrainingDiverged(HarnessError):
    """The loss became NaN or infinite: the fine-tune is worthless from that step on."""


class MlflowStepLogger(TrainerCallback):
    """Sends the Trainer's per-step logs to the fine-tune run under the harness's metric names."""

    RENAME = {"loss": "train_loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm", "eval_loss": "eval_loss"}
    # Format-vs-content losses (harness.loss_classes) keep their names.
    RENAME.update({name: name for name in (
        "train_loss_format", "train_loss_content", "train_tokens_format", "train_tokens_content",
        "eval_loss_format", "eval_loss_content",
    )})

    def __init__(self, run: RunHandle):
        self.run = run

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = {self.RENAME[key]: value for key, value in (logs or {}).items() if key in self.RENAME}
        if metrics:
            self.run.log_metrics(metrics, step=state.global_step)
        loss = metrics.get("train_loss")
        if loss is not None and not math.isfinite(loss):
            raise TrainingDiverged(f"train_loss became {loss} at step {state.global_step}")


class EpochCheckpointRecorder(TrainerCallback):
    """Remembers which checkpoint directory belongs to which epoch (the Trainer names them by step)."""

    def __init__(self):
        self.saved: list[tuple[int, int]] = []

    def on_save(self, args, state, control, **kwargs):
        self.saved.append((round(state.epoch or 0), state.global_step))


def lora_config(cfg: TrainConfig) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )


def train_sft(
    model,
    tokenizer,
    train_rows: list[FinetuneRow],
    val_rows: list[FinetuneRow],
    cfg: TrainConfig,
    *,
    seed: int,
    output_dir: Path,
    run: RunHandle,
) -> list[EpochCheckpoint]:
    """Fine-tune `model` with LoRA on `train_rows`; return the adapter saved after each epoch."""
    on_gpu = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        logging_steps=1,
        save_strategy="epoch",
        eval_strategy="epoch" if val_rows else "no",
        seed=seed,
        data_seed=seed,
        max_length=cfg.max_length,
        completion_only_loss=True,
        remove_unused_columns=False,  # keeps token_classes, which mark format vs content response tokens
        dataset_kwargs={"skip_prepare_dataset": True},  # rows come tokenized, with labels on the reply only
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=cfg.gradient_checkpointing,
        report_to="none",
        dataloader_num_workers=0,
        use_cpu=not on_gpu,
    )
    recorder = EpochCheckpointRecorder()
    # TRL pads on the right for training; generation elsewhere wants left padding, so restore it after.
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        trainer = ClassLossSFTTrainer(
            model=model,
            args=args,
            train_dataset=class_dataset(tokenizer, train_rows, max_length=cfg.max_length),
            eval_dataset=class_dataset(tokenizer, val_rows, max_length=cfg.max_length) if val_rows else None,
            processing_class=tokenizer,
            data_collator=ClassCollator(pad_token_id(tokenizer)),
            peft_config=lora_config(cfg),
            callbacks=[MlflowStepLogger(run), recorder],
        )
        trainer.train()
    finally:
        tokenizer.padding_side = padding_side
    checkpoints = [
        EpochCheckpoint(epoch=epoch, step=step, path=output_dir / f"checkpoint-{step}") for epoch, step in recorder.saved
    ]
    missing = [str(checkpoint.path) for checkpoint in checkpoints if not checkpoint.path.is_dir()]
    if missing:
        raise HarnessError(f"training finished but checkpoint directories are missing: {', '.join(missing)}")
    return checkpoints
