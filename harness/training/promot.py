"""ProMoT (Wang et al., ICLR 2024): learn the *format* into a soft prompt, then the *content* into LoRA.

Study B's causal test of "format over-fitting erodes safety":
- Stage 1 prepends `l` trainable virtual tokens to the input embeddings and trains only them (the model is
  frozen). Format, common to every example, is the cheapest thing for the prompt to absorb.
- Stage 2 keeps that prompt frozen and prepended and trains a LoRA adapter with SFT's settings. Since the
  prompt already carries the format, the adapter's gradient comes mostly from content.
- At inference the prompt is thrown away: base model + stage-2 adapter alone generate. `SoftPromptedLM`
  can put it back, to show that the prompt really holds the format.

peft cannot combine prompt tuning with LoRA in one model, so the prompt lives in this module's own wrapper:
`SoftPromptedLM` embeds the token ids, prepends the prompt, and calls the (optionally LoRA-wrapped) model
with `inputs_embeds`. Both stages train through transformers' Trainer.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from harness import runtime
from harness.config import PromotConfig, RuntimeConfig, TrainConfig
from harness.data.registry import FinetuneRow
from harness.errors import HarnessError
from harness.training.loss_classes import ClassCollator, ClassLossMixin, class_dataset, pad_token_id
from harness.training.checkpoints import EpochCheckpoint, epoch_checkpoints, resume_point
from harness.seeding import seed_everything
from harness.training.sft import (TRAINER_SPEED_ARGUMENTS, MlflowStepLogger, keep_adapter_in_float32, lora_config,
                                  user_message)
from tracking import RunHandle
from tracking.schema import Tag

PROMPT_FILE = "soft_prompt.safetensors"
META_FILE = "soft_prompt.json"
# ProMoT's numerics on CUDA (see `cuda_numerics`); the defaults live in the config's `runtime:` section.
DEFAULT_PROMOT_PRECISION = RuntimeConfig().promot_precision  # fp32, measured: bf16 + SDPA went non-finite in
DEFAULT_PROMOT_ATTENTION = RuntimeConfig().promot_attention  # stage 1 (benchmarks/promot_nan.py); sdpa


class PromotError(HarnessError):
    """A ProMoT stage cannot run as configured (bad prompt length, missing or foreign stage-1 prompt)."""


# --- the soft prompt ---------------------------------------------------------------------------------


@dataclass
class SoftPrompt:
    """A trained stage-1 prompt and what it was trained on; `model_digest` ties it to one base model."""

    embeddings: torch.Tensor  # (length, hidden_size), float32
    meta: dict[str, Any]

    @property
    def length(self) -> int:
        return self.embeddings.shape[0]

    def save(self, directory: Path) -> Path:
        """Tensor + metadata, the tensor written under a temporary name first so a crash leaves no half file."""
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (PROMPT_FILE + ".tmp")
        save_file({"prompt": self.embeddings.detach().cpu().contiguous()}, str(tmp))
        meta = {**self.meta, "sha256": tensor_digest(self.embeddings), "shape": list(self.embeddings.shape)}
        (directory / (META_FILE + ".tmp")).write_text(json.dumps(meta, indent=2, default=str))
        tmp.replace(directory / PROMPT_FILE)
        (directory / (META_FILE + ".tmp")).replace(directory / META_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, expect_model_digest: str | None = None) -> "SoftPrompt":
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / PROMPT_FILE).is_file() or not (directory / META_FILE).is_file():
            raise PromotError(f"stage-1 prompt not found: {directory} needs {PROMPT_FILE} and {META_FILE}")
        meta = json.loads((directory / META_FILE).read_text())
        embeddings = load_file(str(directory / PROMPT_FILE))["prompt"]
        if meta.get("sha256") and meta["sha256"] != tensor_digest(embeddings):
            raise PromotError(f"stage-1 prompt {directory / PROMPT_FILE} does not match the checksum in {META_FILE}")
        if expect_model_digest and meta.get("model_digest") != expect_model_digest:
            raise PromotError(
                f"stage-1 prompt {directory} was trained on model {meta.get('model')!r} "
                f"(digest {meta.get('model_digest')}), not on the model under study (digest {expect_model_digest})"
            )
        return cls(embeddings, meta)


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def initial_prompt(model, tokenizer, length: int, init: str, init_text: str | None, seed: int) -> torch.Tensor:
    """Stage 1's starting point, (length, hidden) in float32.

    `random` samples `length` rows of the vocabulary's embedding matrix (Lester et al. 2021's "sampled
    vocab" init), so the prompt starts at the scale of real token embeddings; `text` embeds `init_text`,
    repeated or cut to `length` tokens, as peft's TEXT init does.
    """
    table = model.get_input_embeddings().weight.detach()  # (vocab, hidden)
    if init == "text":
        ids = tokenizer(init_text or "", add_special_tokens=False)["input_ids"]
        if not ids:
            raise PromotError("promot.init_text is empty: give the text whose embeddings start the prompt")
        ids = (ids * math.ceil(length / len(ids)))[:length]
    else:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, table.shape[0], (length,), generator=generator).tolist()
    return table[torch.tensor(ids, device=table.device)].float().cpu().clone()


class SoftPromptedLM(nn.Module):
    """A causal LM (plain or LoRA-wrapped) whose input is preceded by a soft prompt.

    The prompt goes before everything, padding included: positions come from the attention mask, so a
    left-padded generation batch and a right-padded training batch see the prompt at the same positions.
    """

    def __init__(self, model, prompt: torch.Tensor, *, trainable: bool):
        super().__init__()
        self.model = model
        self.prompt = nn.Parameter(prompt.clone().float().to(model.device), requires_grad=trainable)

    @property
    def device(self) -> torch.device:
        return self.prompt.device

    @property
    def config(self):
        return self.model.config

    def gradient_checkpointing_enable(self, **kwargs):
        self.model.gradient_checkpointing_enable(**kwargs)

    def _with_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        embed = self.model.get_input_embeddings()
        tokens = embed(input_ids)  # (batch, seq, hidden)
        batch = input_ids.shape[0]
        prompt = self.prompt.to(tokens.dtype).unsqueeze(0).expand(batch, -1, -1)  # (batch, l, hidden)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prompt_mask = attention_mask.new_ones(batch, self.prompt.shape[0])
        return torch.cat([prompt, tokens], dim=1), torch.cat([prompt_mask, attention_mask], dim=1)

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        inputs_embeds, attention_mask = self._with_prompt(input_ids, attention_mask)
        if labels is not None:
            ignore = labels.new_full((labels.shape[0], self.prompt.shape[0]), -100)
            labels = torch.cat([ignore, labels], dim=1)  # the prompt is never a target
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Like `generate` on token ids: returns the ids followed by the new tokens."""
        inputs_embeds, attention_mask = self._with_prompt(input_ids, attention_mask)
        new_tokens = self.model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
        return torch.cat([input_ids, new_tokens.to(input_ids.device)], dim=1)


# --- training -----------------------------------------------------------------------------------------


class _PromptedTrainer(ClassLossMixin, Trainer):
    """Trainer for `SoftPromptedLM`, logging format/content losses.

    A checkpoint holds only what training changes: the LoRA adapter (stage 2), beside the optimizer,
    scheduler and RNG states the Trainer adds, so a killed stage 2 resumes from its last epoch. The frozen
    model is never written (the Trainer's default would save it whole: 100s of MB per epoch).
    """

    def _save(self, output_dir=None, state_dict=None):
        lora = self.model.model
        if not hasattr(lora, "peft_config"):
            raise HarnessError("only ProMoT stage 2 (a LoRA model) saves Trainer checkpoints")
        lora.save_pretrained(output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(str(Path(resume_from_checkpoint) / "adapter_model.safetensors"))
        set_peft_model_state_dict(self.model.model, weights)


def cuda_numerics(model) -> dict[str, str]:
    """How ProMoT trains on CUDA, applied to `model` and returned as run tags.

    On the GPU (issue 12) Qwen2.5-Coder-1.5B's stage 1 (LR 0.1 on the soft prompt) produced non-finite
    gradients in bfloat16 in 4 of 6 runs, and one stage 2 did too; fp32 on the CPU never has. Two switches
    let a run choose, and both are recorded: `runtime.promot_precision` bf16|fp32 (fp32 uses TF32 matmuls)
    and `runtime.promot_attention` sdpa|eager (harness/runtime.py; HARNESS_PROMOT_PRECISION and
    HARNESS_PROMOT_ATTENTION override them). The default, fp32 + SDPA, is the one measured to stay finite
    (bf16 + SDPA: NaN at step 8; fp32: finite, no slower in stage 1; bf16 + eager: finite but a gradient
    norm of 147). fp32 needs more memory: see `micro_batching`.
    """
    settings = runtime.current()
    micro = {Tag.PROMOT_MICRO_BATCH.key: str(settings.promot_micro_batch or "off")}
    if not torch.cuda.is_available():
        return {Tag.PROMOT_PRECISION.key: "fp32 (cpu)", **micro}
    precision, attention = settings.promot_precision, settings.promot_attention
    if precision == "fp32" and not getattr(model, "is_loaded_in_4bit", False):
        model.to(torch.float32)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model.set_attn_implementation(attention)
    return {Tag.PROMOT_PRECISION.key: precision, Tag.PROMOT_ATTENTION.key: attention, **micro}


def micro_batching(batch_size: int, grad_accum: int) -> tuple[int, int]:
    """(per-device batch, accumulation steps) with `runtime.promot_micro_batch` (HARNESS_PROMOT_MICRO_BATCH) applied.

    Splitting each batch into micro-batches and accumulating them gives the same examples per optimizer step
    and the same token-normalised loss, in less memory: it is how a fine-tune that does not fit (ProMoT in fp32
    on a 1.5B model at batch 16, issue 12) runs at the paper's batch size. Not part of any unit's identity,
    like the fast training path; recorded as the tag `harness.promot_micro_batch`.
    """
    settings = runtime.current()
    micro = settings.promot_micro_batch
    if micro is None:
        return batch_size, grad_accum
    if batch_size % micro:  # the config checks its own value; an environment override is checked here
        raise PromotError(f"{settings.source('promot_micro_batch')}={micro} must divide train.batch_size {batch_size}")
    return micro, grad_accum * (batch_size // micro)


def _arguments(output_dir: Path, *, learning_rate, lr_scheduler, warmup_steps, batch_size, grad_accum, seed,
               gradient_checkpointing: bool, epochs: float | None = None, max_steps: int = -1, eval_rows: bool,
               save_epochs: bool = False) -> TrainingArguments:
    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu and torch.cuda.is_bf16_supported() and runtime.current().promot_precision == "bf16"
    train_batch, grad_accum = micro_batching(batch_size, grad_accum)
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs or 1,
        max_steps=max_steps,
        per_device_train_batch_size=train_batch,
        per_device_eval_batch_size=train_batch,
        gradient_accumulation_steps=grad_accum,
        learning_rate=learning_rate,
        lr_scheduler_type=lr_scheduler,
        warmup_steps=warmup_steps,
        logging_steps=1,
        save_strategy="epoch" if save_epochs else "no",
        eval_strategy="epoch" if eval_rows else "no",
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        logging_nan_inf_filter=False,  # a NaN loss must reach MlflowStepLogger, which fails the run on it
        gradient_checkpointing=gradient_checkpointing,
        **({"gradient_checkpointing_kwargs": {"use_reentrant": False}} if gradient_checkpointing else {}),
        remove_unused_columns=False,
        report_to="none",
        dataloader_num_workers=0,
        use_cpu=not on_gpu,
        **TRAINER_SPEED_ARGUMENTS,
    )


def stage1_steps(n_rows: int, batch_size: int, grad_accum: int, epochs: float) -> int:
    """Optimiser steps for a possibly fractional number of epochs (Study B: 0.5), at least one."""
    per_epoch = math.ceil(n_rows / batch_size / grad_accum)
    return max(1, math.ceil(per_epoch * epochs))


def train_stage1(
    model,
    tokenizer,
    train_rows: list[FinetuneRow],
    cfg: PromotConfig,
    train_cfg: TrainConfig,
    *,
    seed: int,
    output_dir: Path,
    run: RunHandle,
    meta: dict[str, Any],
) -> SoftPrompt:
    """Train only the soft prompt on a frozen model; returns the prompt, also saved under `output_dir`."""
    check_prompt_length(model, cfg.prompt_length, train_cfg.max_length)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    run.set_tags(cuda_numerics(model))
    seed_everything(seed)
    init = initial_prompt(model, tokenizer, cfg.prompt_length, cfg.init, cfg.init_text, seed)
    wrapped = SoftPromptedLM(model, init, trainable=True)
    s1 = cfg.stage1
    steps = stage1_steps(len(train_rows), s1.batch_size, s1.grad_accum, s1.epochs)
    args = _arguments(
        output_dir, learning_rate=s1.learning_rate, lr_scheduler=s1.lr_scheduler, warmup_steps=s1.warmup_steps,
        batch_size=s1.batch_size, grad_accum=s1.grad_accum, seed=seed, max_steps=steps,
        gradient_checkpointing=False, eval_rows=False,
    )
    trainer = _PromptedTrainer(
        model=wrapped,
        args=args,
        train_dataset=class_dataset(tokenizer, train_rows, max_length=train_cfg.max_length),
        data_collator=ClassCollator(pad_token_id(tokenizer)),
        callbacks=[MlflowStepLogger(run)],
    )
    trainer.train()
    prompt = SoftPrompt(
        wrapped.prompt.detach().float().cpu().clone(),
        {**meta, "length": cfg.prompt_length, "init": cfg.init, "init_text": cfg.init_text, "steps": steps,
         "epochs": s1.epochs, "learning_rate": s1.learning_rate, "seed": seed, "n_rows": len(train_rows)},
    )
    prompt.save(output_dir)
    return prompt


def train_stage2(
    model,
    tokenizer,
    train_rows: list[FinetuneRow],
    val_rows: list[FinetuneRow],
    prompt: SoftPrompt,
    cfg: TrainConfig,
    *,
    seed: int,
    output_dir: Path,
    run: RunHandle,
) -> list[EpochCheckpoint]:
    """LoRA on the model with the frozen stage-1 prompt prepended; an adapter saved after every epoch."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    check_prompt_length(model, prompt.length, cfg.max_length)
    run.set_tags(cuda_numerics(model))
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    # get_peft_model draws `lora_A` from the global RNG, and the Trainer seeds only later: without this the
    # adapter depended on what the process ran before (a rerun that reuses stage 1 trained another one).
    seed_everything(seed)
    peft_model = get_peft_model(model, lora_config(cfg))
    run.set_tags({Tag.ADAPTER_DTYPE.key: keep_adapter_in_float32(peft_model)})  # PEFT's float32 already, as SFT's
    wrapped = SoftPromptedLM(peft_model, prompt.embeddings, trainable=False)
    args = _arguments(
        output_dir, learning_rate=cfg.learning_rate, lr_scheduler=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps,
        batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, seed=seed, epochs=cfg.epochs,
        gradient_checkpointing=cfg.gradient_checkpointing, eval_rows=bool(val_rows), save_epochs=True,
    )
    if cfg.gradient_checkpointing:
        peft_model.enable_input_require_grads()
    trainer = _PromptedTrainer(
        model=wrapped,
        args=args,
        train_dataset=class_dataset(tokenizer, train_rows, max_length=cfg.max_length),
        eval_dataset=class_dataset(tokenizer, val_rows, max_length=cfg.max_length) if val_rows else None,
        data_collator=ClassCollator(pad_token_id(tokenizer)),
        callbacks=[MlflowStepLogger(run)],
    )
    trainer.train(resume_from_checkpoint=resume_point(output_dir, run.resumed))
    return epoch_checkpoints(output_dir)


def check_prompt_length(model, prompt_length: int, max_length: int) -> None:
    """The prompt plus the longest training example must fit in the model's context."""
    if prompt_length < 1:
        raise PromotError(f"promot.prompt_length must be at least 1, got {prompt_length}")
    context = getattr(model.config, "max_position_embeddings", None)
    if context and prompt_length + max_length > context:
        raise PromotError(
            f"promot.prompt_length {prompt_length} + train.max_length {max_length} exceeds the model's context "
            f"of {context} tokens"
        )

