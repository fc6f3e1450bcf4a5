"""Supervised fine-tuning (Study B's SFT arm): TRL's SFTTrainer with a peft LoRA adapter.

Loss is on response tokens only (TRL's prompt–completion format), the model's own chat template frames
every example, and an adapter checkpoint is written after every epoch so each epoch can be evaluated.
Per-step `train_loss`, `learning_rate` and `grad_norm` (and per-epoch `eval_loss`) go to the fine-tune run.

On CUDA, training takes the fast path of `harness.training.fast_training` (benchmarks/RESULTS.md, "`harness run`'s
SFT with the fast path": 2.7x tokens/s on Study B rows): a micro-batch's examples are packed into rows of at
most `max_length` tokens instead of padded to the longest (`PackedClassCollator`, which carries the
format/content `token_classes` along), the gradient-accumulation micro-batches of a step are merged into one
forward pass where the packed step fits the padded path's token budget (`merge_accumulation`), and AdamW is
the fused one. `runtime.fast_training: false` (or `HARNESS_FAST_TRAINING=0`) switches it off. The examples
of every step, the steps, the
learning-rate schedule, the loss normalisation (summed token loss over the step's loss tokens) and the logged
losses are the same either way; only padding and kernels change.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from harness import faults
from harness.training.checkpoints import EpochCheckpoint, epoch_checkpoints, resume_point
from harness.config import TrainConfig
from harness.data.registry import FinetuneRow
from harness.errors import HarnessError
from harness.training.fast_training import (
    FAST_TRAINING_ARGUMENTS,
    PackedClassCollator,
    fast_training_unavailable,
    merge_accumulation,
)
from harness.training.loss_classes import ClassCollator, ClassLossMixin, class_dataset, pad_token_id
from harness.seeding import seed_everything
from tracking import RunHandle
from tracking.schema import Metric, Tag


def user_message(row: FinetuneRow) -> str:
    """The user turn: the instruction, followed by its input when there is one (Alpaca/Dolly style)."""
    return f"{row.instruction}\n\n{row.input}" if row.input else row.instruction


class ClassLossSFTTrainer(ClassLossMixin, SFTTrainer):
    """TRL's SFTTrainer that also logs the format and content token losses of every step (issue 10)."""


class TrainingDiverged(HarnessError):
    """The loss became NaN or infinite: the fine-tune is worthless from that step on."""


class MlflowStepLogger(TrainerCallback):
    """Sends the Trainer's per-step logs to the fine-tune run under the harness's metric names."""

    RENAME = {"loss": Metric.TRAIN_LOSS, "learning_rate": "learning_rate", "grad_norm": "grad_norm",
              "eval_loss": Metric.EVAL_LOSS,
              # the Trainer's end-of-training speed (TRAINER_SPEED_ARGUMENTS: real tokens, not padding)
              "train_runtime": Metric.TRAIN_RUNTIME, "train_tokens_per_second": Metric.TRAIN_TOKENS_PER_SECOND}
    # Format-vs-content losses (harness.training.loss_classes) keep their names.
    RENAME.update({name: name for name in (
        Metric.TRAIN_LOSS_FORMAT, Metric.TRAIN_LOSS_CONTENT, "train_tokens_format", "train_tokens_content",
        "eval_loss_format", "eval_loss_content",
    )})

    def __init__(self, run: RunHandle):
        self.run = run
        # A reattached run (issue 8) resumes from its last checkpoint and replays the steps after it: their
        # points are already in the curve, so each metric continues after the last step it has.
        self.logged_through = {}
        if run.resumed:
            self.logged_through = {name: run.last_step(name) for name in set(self.RENAME.values())}

    def on_train_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_end(self, args, state, control, **kwargs):
        """The process's peak GPU memory over the training (what a card must hold: the weights, 4-bit or not, the
        optimizer state and the activations, plus whatever else the process keeps loaded, such as the runner's
        evaluation copy of the base model), so that QLoRA and bf16 LoRA compare on the runs themselves."""
        if torch.cuda.is_available():
            self.run.log_metrics({Metric.PEAK_GPU_MEMORY: torch.cuda.max_memory_allocated() / 2**30},
                                 step=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = {self.RENAME[key]: value for key, value in (logs or {}).items() if key in self.RENAME}
        fresh = {name: value for name, value in metrics.items()
                 if (self.logged_through.get(name) is None or state.global_step > self.logged_through[name])}
        if fresh:
            self.run.log_metrics(fresh, step=state.global_step)
        # A non-finite gradient norm poisons the weights at that step even while the reported loss is still
        # finite (seen on the GPU in ProMoT stage 1, issue 12); the loss shows it only one step later.
        for name in (Metric.TRAIN_LOSS, "grad_norm"):
            value = metrics.get(name)
            if value is not None and not math.isfinite(value):
                raise TrainingDiverged(f"{name} became {value} at step {state.global_step}: the weights are no "
                                       "longer finite, so this fine-tune is stopped")
        if Metric.TRAIN_LOSS in metrics:
            faults.reached("train_step")


TRAINER_SPEED_ARGUMENTS = {"include_num_input_tokens_seen": "non_padding"}
"""Makes the Trainer count the real (non-padding) input tokens it trains on, so the fine-tune run gets
`train_tokens_per_second` at the end (MlflowStepLogger): QLoRA and LoRA on bf16 weights compare by it."""


def resolve_optimizer(requested: str) -> tuple[str, str]:
    """The `optim` the Trainer gets, and the `harness.optimizer` tag: 8-bit AdamW (Study A) needs CUDA and
    bitsandbytes; without them plain AdamW runs instead and the tag says why."""
    if requested != "adamw_bnb_8bit":
        return requested, requested
    if not torch.cuda.is_available():
        return "adamw_torch", "adamw_torch (adamw_bnb_8bit requested; fallback: no CUDA)"
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return "adamw_torch", "adamw_torch (adamw_bnb_8bit requested; fallback: bitsandbytes not installed)"
    return "adamw_bnb_8bit", "adamw_bnb_8bit"


def keep_adapter_in_float32(model) -> str:
    """Trainable (LoRA) parameters back to float32 before the optimizer exists; returns their dtype for the
    `harness.adapter_dtype` tag.

    TRL's SFTTrainer casts a 4-bit model's LoRA weights to bfloat16 (the QLoRA paper's recipe, at its LR 2e-4), and
    AdamW then updates them in bfloat16. At Study B's 5e-5 most of lora_A's updates are below half a bf16 step and
    round away: simulated over Study B's 90 steps, 46% of lora_A's entries never moved and its update reached 0.68
    of the float32 one (0.95 at 2e-4). On the H200 the QLoRA JSON arm trained that way eroded less than the bf16
    arm (docs/results/study_b_qlora_qwen2.5-coder-1.5b.md). PEFT keeps float32 adapters over a bf16 base, so
    float32 here leaves the base weights as the one difference between QLoRA and LoRA."""
    dtypes = set()
    for parameter in model.parameters():
        if parameter.requires_grad:
            if parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()
            dtypes.add(str(parameter.dtype).removeprefix("torch."))
    return ",".join(sorted(dtypes)) or "none"


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
    fast = on_gpu and fast_training_unavailable() is None
    train_dataset = class_dataset(tokenizer, train_rows, max_length=cfg.max_length)
    eval_dataset = class_dataset(tokenizer, val_rows, max_length=cfg.max_length) if val_rows else None
    batch_size, grad_accum = cfg.batch_size, cfg.grad_accum
    optim, optimizer_tag = resolve_optimizer(cfg.optimizer)
    run.set_tags({Tag.OPTIMIZER.key: optimizer_tag})
    if fast:  # packed: fewer, fuller forward passes for the same examples a step (see merge_accumulation)
        lengths = [len(ids) for ids in train_dataset["input_ids"]]
        batch_size, grad_accum = merge_accumulation(lengths, cfg.batch_size, cfg.grad_accum, cfg.max_length)
    args = SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        logging_steps=1,
        logging_nan_inf_filter=False,  # a NaN loss must reach MlflowStepLogger, which fails the run on it
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
        **TRAINER_SPEED_ARGUMENTS,
        use_cpu=not on_gpu,
        **{**(FAST_TRAINING_ARGUMENTS if fast else {}), **({"optim": optim} if optim != "adamw_torch" else {})},
    )
    pad_id = pad_token_id(tokenizer)
    # Packed rows restart position_ids at every example (block-causal attention): the padded batch's losses.
    collator = PackedClassCollator(pad_id, cfg.max_length) if fast else ClassCollator(pad_id)
    # TRL pads on the right for training; generation elsewhere wants left padding, so restore it after.
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        # The trainer creates the LoRA adapter (random `lora_A`): seeded here, not left to TRL (issue 19).
        seed_everything(seed)
        trainer = ClassLossSFTTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            data_collator=collator,
            peft_config=lora_config(cfg),
            callbacks=[MlflowStepLogger(run)],
        )
        run.set_tags({Tag.ADAPTER_DTYPE.key: keep_adapter_in_float32(trainer.model)})
        trainer.train(resume_from_checkpoint=resume_point(output_dir, run.resumed))  # None: from step 0
    finally:
        tokenizer.padding_side = padding_side
    return epoch_checkpoints(output_dir)  # every epoch's, also those saved before an interruption
