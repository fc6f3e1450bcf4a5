"""Faster LoRA fine-tuning steps: packed rows, a chunked LM-head loss, fused AdamW, no recomputation.

Why plain PEFT is slow on real SFT data: every sequence of a batch is padded to the longest (Alpaca-style
examples average ~110 tokens, so a batch of 16 is mostly padding); the LM head writes full float32 logits
(16 × 512 tokens × 128k vocabulary = 4 GB, written and read several times) although only completion tokens
carry loss; AdamW launches kernels per LoRA tensor; and an 8B model needs gradient checkpointing, which
runs the forward twice. Here:

- `pack` puts a step's examples into rows of at most `capacity` tokens (first-fit decreasing), and
  `packed_batch` restarts `position_ids` at every example, which transformers reads as packed sequences
  and turns into a block-causal mask: each token sees its own example only, so the loss is the padded
  batch's loss, over the same tokens, without the padding;
- `chunked_cross_entropy` computes the loss and its input gradient chunk by chunk, only at labelled
  positions, and never holds the whole logits;
- `FAST_TRAINING_ARGUMENTS` are the `TrainingArguments` that go with it (fused AdamW).

`PackedCompletionCollator` is the same packing as a `Trainer`/TRL data collator; `PackedClassCollator` is
the one `harness.training.sft.train_sft` uses on CUDA (`fast_training_unavailable` says when): it also packs the
format/content `token_classes` of `harness.training.loss_classes`, so the class losses come from the same packed
pass. In `train_sft` the LM-head loss is TRL's own fused, chunked one (`trl.trainer.utils.add_fused_lm_head`,
which `ClassLossMixin` already reads per-token log-probabilities from), so `chunked_cross_entropy` serves the
standalone loop of `harness bench`. The SFT fast path is packing, `merge_accumulation` (short SFT rows leave
a packed micro-batch small enough that the step is bound by kernel launches, so fewer, fuller passes pay) and
fused AdamW. `compile_layers` is not part of it: inside TRL's trainer it was slower on Study B rows and its
losses drifted from the eager path's (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from harness import runtime
from harness.runtime import Runtime

IGNORE = -100  # label of positions that carry no loss (transformers' convention)
LOGITS_PER_CHUNK = 1 << 27  # float32 logits held at once by the chunked loss: 512 MiB

# Merged into SFTConfig / TrainingArguments by harness/training/sft.py when the fast path is on (see the module doc).
FAST_TRAINING_ARGUMENTS = {"optim": "adamw_torch_fused"}


def fast_training_unavailable(settings: Runtime | None = None) -> str | None:
    """Why `train_sft` would not take the fast path; None when it would (CUDA, and not switched off).

    The switch is `runtime.fast_training` (harness/runtime.py; default the current runtime), which
    `HARNESS_FAST_TRAINING` overrides: `1` (or true/yes/on) on, `0` (or false/no/off) off.
    """
    off = (settings or runtime.current()).switched_off("fast_training")
    if off is not None:
        return off
    if not torch.cuda.is_available():
        return "not on CUDA"
    return None


def merge_accumulation(lengths: Sequence[int], batch_size: int, grad_accum: int, max_length: int) -> tuple[int, int]:
    """(per-device batch, accumulation steps) for packed training: as few micro-batches a step as memory allows.

    A step's examples and its gradient do not depend on the split (the sampler's order is the same, and the
    loss is the step's summed token loss over its loss-token count), so `grad_accum` micro-batches of
    `batch_size` can run as `grad_accum / m` of `batch_size * m` for any divisor m. The largest m is taken
    whose worst-case packed micro-batch, the `batch_size * m` longest examples of `lengths`, holds no more
    tokens than `batch_size * max_length`, the most a padded micro-batch of the configured size can hold.
    """
    if grad_accum < 1 or batch_size < 1:
        raise ValueError("batch_size and grad_accum must be at least 1")
    longest = sorted(lengths, reverse=True)
    for m in range(grad_accum, 1, -1):
        if grad_accum % m == 0 and sum(longest[: batch_size * m]) <= batch_size * max_length:
            return batch_size * m, grad_accum // m
    return batch_size, grad_accum


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of the examples in each row: first-fit decreasing, every row at most `capacity` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > capacity:
            raise ValueError(f"example of {lengths[i]} tokens is longer than the row capacity {capacity}")
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def packed_batch(
    examples: list[tuple[list[int], list[int]]],
    rows: list[list[int]],
    pad_token_id: int,
    token_classes: Sequence[Sequence[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """`input_ids`, `position_ids`, `labels` of shape (rows, longest row) from (input_ids, labels) examples.

    Each example's first label is dropped: in a packed row it would be predicted from the previous
    example's last token (in a padded batch nothing predicts it). Padding at a row's end restarts its
    positions at 0, so it forms a block of its own and is never attended to by real tokens.
    `token_classes` (one list per example, aligned with its labels; `harness.training.loss_classes`) are packed the
    same way into a `token_classes` tensor: first class of each example dropped (0), padding 0.
    """
    width = max(sum(len(examples[i][0]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    classes = torch.zeros((len(rows), width), dtype=torch.long) if token_classes is not None else None
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            tokens, targets = examples[i]
            n = len(tokens)
            ids[r, at : at + n] = torch.tensor(tokens)
            labels[r, at + 1 : at + n] = torch.tensor(targets[1:], dtype=torch.long)
            if classes is not None:
                classes[r, at + 1 : at + n] = torch.tensor(list(token_classes[i])[1:], dtype=torch.long)
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    batch = {"input_ids": ids, "position_ids": positions, "labels": labels}
    if classes is not None:
        batch["token_classes"] = classes
    return batch


class PackedCompletionCollator:
    """A `Trainer` data collator that packs the batch (see `pack`) instead of padding it.

    Takes TRL's tokenized examples (`input_ids` with `labels`, or with `completion_mask` / `assistant_masks`;
    with none of them every token is a target) and returns `input_ids`, `position_ids` and `labels`, with no
    `attention_mask`: transformers then builds the block-causal mask from the positions (it does so only
    when `use_cache=False`, which TRL sets for training).
    """

    def __init__(self, pad_token_id: int, max_length: int):
        self.pad_token_id, self.max_length = pad_token_id, max_length

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        examples = []
        for feature in features:
            ids = list(feature["input_ids"])[: self.max_length]
            if "labels" in feature:  # TRL >= 1.x folds its masks into a labels column
                labels = list(feature["labels"])[: len(ids)]
            else:
                mask = feature.get("completion_mask", feature.get("assistant_masks"))
                mask = [1] * len(ids) if mask is None else list(mask)[: len(ids)]
                labels = [t if m else IGNORE for t, m in zip(ids, mask)]
            examples.append((ids, labels))
        rows = pack([len(ids) for ids, _ in examples], self.max_length)
        return packed_batch(examples, rows, self.pad_token_id)


class PackedClassCollator:
    """`harness.training.loss_classes.ClassCollator`'s packed twin: the same examples, packed instead of padded.

    Takes `class_dataset` examples (`input_ids`, `attention_mask` of ones, `labels`, `token_classes`) and
    packs them (`pack`, rows of at most `capacity` tokens; an example longer than that gets a row of its
    own) into `input_ids`, `position_ids`, `labels` and `token_classes`, with no `attention_mask`, so that
    transformers builds the block-causal mask from the restarting positions. The loss and the format and
    content losses are then those of the padded batch, over the same tokens (tests/unit/test_fast_training.py).
    """

    def __init__(self, pad_token_id: int, capacity: int):
        self.pad_token_id, self.capacity = pad_token_id, capacity

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        from harness.errors import HarnessError

        examples, classes = [], []
        for feature in features:
            ids, targets, token_classes = list(feature["input_ids"]), list(feature["labels"]), list(feature["token_classes"])
            if len(targets) != len(ids) or len(token_classes) != len(ids):
                raise HarnessError("an example's input_ids, labels and token_classes differ in length")
            if not all(feature.get("attention_mask") or [1]):
                raise HarnessError("packing needs unpadded examples (an attention_mask of ones)")
            examples.append((ids, targets))
            classes.append(token_classes)
        lengths = [len(ids) for ids, _ in examples]
        rows = pack(lengths, max(self.capacity, *lengths))
        return packed_batch(examples, rows, self.pad_token_id, token_classes=classes)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropies of `hidden @ weight.T` against `targets`, never holding all the logits.

    The gradient is computed in the forward, chunk by chunk (softmax minus one-hot, times the weight),
    and kept for the backward: holding (tokens × hidden) instead of (tokens × vocab) floats.
    Logits are rounded to the weight's dtype before the float32 softmax, exactly as transformers'
    LM head and loss do, so the loss values agree with the plain path's.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n, vocab = hidden.shape[0], weight.shape[0]
        chunk = max(1, LOGITS_PER_CHUNK // vocab)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for start in range(0, n, chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            logits = (h @ weight.t()).float()  # (chunk, vocab)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad[torch.arange(len(t), device=t.device), t] -= 1  # d(sum of CE) / d(logits)
            grad = grad.to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = grad @ weight
            if grad_weight is not None:
                grad_weight += (grad.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the LM head `weight` (vocab, hidden) over `hidden` (tokens, hidden) rows."""
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets)


def packed_loss(model: Any, batch: dict[str, torch.Tensor], normalizer: int | torch.Tensor) -> torch.Tensor:
    """Summed completion cross-entropy of a packed batch divided by `normalizer` (the step's label count).

    Dividing every micro-batch by the whole step's count makes accumulated gradients equal to those of
    the plain path's token-mean loss over the full batch.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = lm.model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
    ).last_hidden_state  # (rows, width, hidden)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    return chunked_cross_entropy(hidden[:, :-1][keep], lm.lm_head.weight, targets[keep]) / normalizer


def micro_batches(rows: list[list[int]], lengths: list[int], max_tokens: int | None) -> list[list[list[int]]]:
    """Split packed rows into micro-batches of at most `max_tokens` (rows × longest row); None: one batch."""
    if max_tokens is None:
        return [rows]
    rows = sorted(rows, key=lambda row: -sum(lengths[i] for i in row))  # a group's first row is its longest
    groups: list[list[list[int]]] = [[]]
    for row in rows:
        width = sum(lengths[i] for i in (groups[-1][0] if groups[-1] else row))
        if groups[-1] and (len(groups[-1]) + 1) * width > max_tokens:
            groups.append([])
        groups[-1].append(row)
    return groups


def compile_layers(model: Any) -> None:
    """`torch.compile` each decoder layer in place (regional compilation), with dynamic shapes.

    Fuses what eager mode runs as separate memory-bound kernels (RMSNorm, rotary, SiLU·mul, LoRA dropout,
    scaling and adds). One compilation serves every layer and every packed-batch shape; it costs tens of
    seconds once per process, so it pays off on long fine-tunes only.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in lm.model.layers:
        layer.compile(dynamic=True)
