"""Format-vs-content training loss: which response tokens the format transform added, and their loss.

Study B explains its results by format being easy to learn. Because `harness.data.formats` renders every
response mechanically, it knows exactly which characters are *format* (`Rendered.format_spans`: the
list's "- " and "\\n- ", JSON's braces, key, brackets, quotes and separators) and which are *content*
(the sentences). This module carries that split through tokenization to the loss, so a trainer can log
`train_loss_format` and `train_loss_content` beside `train_loss` from the same forward pass.

Which tokens are in the loss. As in TRL's completion-only loss for a conversational prompt-completion
example, the loss falls on every token of the chat template's assistant turn after the generation
prompt: the response and the template's end of turn after it (SmolLM2/Qwen: `<|im_end|>` and "\\n";
Llama 3: `<|eot_id|>`). Exactly: the text is the chat template applied to prompt + assistant message,
tokenized once with offsets; the loss starts at the first character where it differs from the template
applied to the prompt alone with the generation prompt, and a token is in the loss when it ends after
that character (so a token merging the end of the prompt with the start of the response is in the loss,
as TRL's token-level common prefix has it). Everything before is `labels = -100` and class 0.

Token classes (`token_classes`, aligned with `labels`): NOT_IN_LOSS = 0 for prompt and padding tokens,
FORMAT = 1, CONTENT = 2; every loss token gets exactly one of FORMAT/CONTENT and every other token 0, so
`(labels != -100) == (token_classes != 0)`. A loss token's class, from the characters it covers:

- CONTENT if it covers any content character ("content wins"). Byte-level BPE merges across the
  boundary: JSON's `.",` is the sentence's "." plus the separator's `",`, the list's ` Open` is the
  marker's space plus "Open". Such a token cannot be emitted without knowing the sentence (where it
  ends, how it starts), so it counts as content. FORMAT is then exactly the tokens made only of
  characters the transform added (`{"`, `procedure`, ` ["`, ` "`, `"]`, `}`, "-", "\\n"), and in every
  format the content class holds every token needed to reproduce the sentences, which keeps the
  content losses comparable across formats. (`straddle="majority"` instead gives a straddling token
  the class of most of its characters, ties to content, for a sensitivity check.)
- FORMAT if it covers format characters and no content character.
- `template_class` (default CONTENT) if it covers only template characters: the end-of-turn tokens
  after the response (and any template characters between the generation prompt and the response).
  They are in the loss (TRL trains them) and are the same in every format; the decision they encode,
  "the procedure ends here", is a content decision, and counting them as format would give prose a
  format class. Pass `template_class=FORMAT` to count them as format instead.

Prose has no format tokens. `render("prose", ...)` records the single spaces joining its sentences as
format spans, but they are the same spaces that separate the words inside a sentence, not something the
transform adds to the text; the tokenizer also merges them into the next word (" Tap"), except before a
digit, where SmolLM2 emits a lone " " token. So `format_spans_of_row` / `format_spans_of_rendered` give
no format spans for prose: every prose response token (and its end of turn) is content, prose runs log
`train_loss_content` (equal to `train_loss`) and no `train_loss_format`. Rows with no format metadata
(other datasets) are all content as well.

Losses. `class_losses(logits, labels, token_classes)` takes the model's logits (causal shift:
`logits[:, t]` predicts `labels[:, t + 1]`) and returns the mean token loss overall and per class from the
same per-token losses, with token counts, so that
`n_format * train_loss_format + n_content * train_loss_content == n_tokens * train_loss`. A class with no
tokens has mean NaN there (never a misleading 0); the trainer logs omit it.

Training. `class_dataset` tokenizes `FinetuneRow`s (user turn from `harness.training.sft.user_message`),
`ClassCollator` pads them on the right and carries `token_classes`, and `ClassLossMixin`, mixed into a
`transformers.Trainer` or `trl.SFTTrainer` subclass, computes the loss with `compute_loss_with_classes`
(one forward) and adds `train_loss_format`, `train_loss_content`, `train_tokens_format` and
`train_tokens_content` (and `eval_*` twins at evaluation) to the Trainer's logs. The logged class losses
are token means over every micro-batch since the previous log, so with `logging_steps=1` they satisfy the
identity above with the Trainer's `loss` (single device); with more logging steps the Trainer's `loss` is
a mean of per-step means instead, and the identity holds only approximately.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from harness.errors import HarnessError

NOT_IN_LOSS, FORMAT, CONTENT = 0, 1, 2
CLASS_NAMES: dict[int, str] = {FORMAT: "format", CONTENT: "content"}
IGNORE_INDEX = -100
_TEMPLATE = 3  # a character of the chat template inside the loss (never a token class)

Straddle = Literal["content", "majority"]
Span = tuple[int, int]


# --- spans of the format transform -------------------------------------------------------------


def format_spans_of_rendered(fmt: str, rendered: Any) -> list[Span]:
    """Format spans to classify a `harness.data.formats.Rendered` response by: none for prose (module docstring)."""
    return [] if fmt == "prose" else [tuple(span) for span in rendered.format_spans]


def format_spans_of_row(row: Any) -> list[Span]:
    """Format spans of a `FinetuneRow` built by `harness.data.formats.build_task_rows`; none for prose and for
    rows without format metadata (every response character is then content)."""
    meta = row.meta or {}
    if meta.get("format") in (None, "prose"):
        return []
    return [(int(start), int(end)) for start, end in meta.get("format_spans") or []]


def _char_classes(response: str, format_spans: Sequence[Span], content_spans: Sequence[Span] | None) -> list[int]:
    """FORMAT or CONTENT for every character of the response; checks the spans."""
    classes = [CONTENT] * len(response)
    for start, end in format_spans:
        if not 0 <= start < end <= len(response):
            raise HarnessError(
                f"format span ({start}, {end}) is empty or outside the response (length {len(response)})"
            )
        for i in range(start, end):
            if classes[i] == FORMAT:
                raise HarnessError(f"format spans overlap at character {i}")
            classes[i] = FORMAT
    if content_spans is not None:
        covered = [False] * len(response)
        for start, end in content_spans:
            if not 0 <= start <= end <= len(response):
                raise HarnessError(f"content span ({start}, {end}) is outside the response (length {len(response)})")
            for i in range(start, end):
                if covered[i] or classes[i] == FORMAT:
                    raise HarnessError(f"content span ({start}, {end}) overlaps another span at character {i}")
                covered[i] = True
        uncovered = [i for i in range(len(response)) if classes[i] != FORMAT and not covered[i]]
        if uncovered:
            raise HarnessError(f"format and content spans leave character {uncovered[0]} of the response uncovered")
    return classes


# --- tokenization ------------------------------------------------------------------------------


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _token_class(char_classes: Sequence[int], template_class: int, straddle: Straddle) -> int:
    """Class of a loss token from the classes of the characters it covers (module docstring)."""
    n_content = sum(1 for c in char_classes if c == CONTENT)
    n_format = sum(1 for c in char_classes if c == FORMAT)
    if n_content == 0 and n_format == 0:
        return template_class
    if straddle == "majority":
        return FORMAT if n_format > n_content else CONTENT
    return CONTENT if n_content else FORMAT


def tokenize_with_classes(
    tokenizer: Any,
    prompt_messages: Sequence[Mapping[str, Any]],
    response: str,
    format_spans: Sequence[Span],
    content_spans: Sequence[Span] | None = None,
    *,
    max_length: int | None = None,
    template_class: int = CONTENT,
    straddle: Straddle = "content",
) -> dict[str, list[int]]:
    """Tokenize a chat example with loss on the assistant turn and a class for every loss token.

    `prompt_messages` are the chat messages before the assistant turn; `response` is the assistant's
    text; `format_spans` are [start, end) character ranges of `response` the format added (everything
    else is content; pass [] for prose, see `format_spans_of_rendered`); `content_spans`, if given, are
    checked to tile the rest. Returns lists `input_ids`, `attention_mask`, `labels` (-100 outside the
    loss) and `token_classes` (NOT_IN_LOSS / FORMAT / CONTENT, see the module docstring), truncated to
    `max_length` keeping the start, as TRL does.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise HarnessError("token classes need a fast tokenizer (offset mapping)")
    if template_class not in CLASS_NAMES:
        raise HarnessError(f"template_class must be FORMAT ({FORMAT}) or CONTENT ({CONTENT}), not {template_class}")
    if straddle not in ("content", "majority"):
        raise HarnessError(f"straddle must be 'content' or 'majority', not {straddle!r}")
    response_classes = _char_classes(response, format_spans, content_spans)

    prompt_messages = [dict(m) for m in prompt_messages]
    prompt_text = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(
        prompt_messages + [{"role": "assistant", "content": response}], tokenize=False
    )
    if full_text.startswith(prompt_text) and full_text.startswith(response, len(prompt_text)):
        response_start = len(prompt_text)
    else:  # a template that renders the prompt differently alone, or alters the content
        response_start = full_text.rfind(response)
        if response_start < 0:
            raise HarnessError("the chat template does not render the response verbatim; cannot place its spans")
    loss_start = min(_common_prefix(prompt_text, full_text), response_start)
    response_end = response_start + len(response)

    # Every character of the text from the start of the loss on: template, or the response's own class.
    char_classes = [NOT_IN_LOSS] * loss_start + [_TEMPLATE] * (len(full_text) - loss_start)
    char_classes[response_start:response_end] = response_classes

    encoding = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels, token_classes = [], []
    for token_id, (start, end) in zip(input_ids, encoding["offset_mapping"]):
        in_loss = end > loss_start if end > start else start >= loss_start
        if in_loss:
            labels.append(token_id)
            token_classes.append(_token_class(char_classes[max(start, loss_start) : end], template_class, straddle))
        else:
            labels.append(IGNORE_INDEX)
            token_classes.append(NOT_IN_LOSS)
    if max_length is not None:
        input_ids, labels, token_classes = input_ids[:max_length], labels[:max_length], token_classes[:max_length]
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": labels,
        "token_classes": token_classes,
    }


def tokenize_row(tokenizer: Any, row: Any, *, max_length: int | None = None, **options: Any) -> dict[str, list[int]]:
    """`tokenize_with_classes` for a `FinetuneRow`: the user turn of `harness.training.sft.user_message`."""
    from harness.training.sft import user_message

    messages = [{"role": "user", "content": user_message(row)}]
    return tokenize_with_classes(
        tokenizer, messages, row.response, format_spans_of_row(row), max_length=max_length, **options
    )


def class_dataset(tokenizer: Any, rows: Sequence[Any], *, max_length: int | None = None, **options: Any):
    """A `datasets.Dataset` of tokenized rows with `token_classes`, ready for `ClassCollator`.

    Rows left without loss tokens by truncation are dropped, as TRL drops them.
    """
    from datasets import Dataset

    examples = [tokenize_row(tokenizer, row, max_length=max_length, **options) for row in rows]
    examples = [e for e in examples if any(label != IGNORE_INDEX for label in e["labels"])]
    if not examples:
        raise HarnessError("no training example has a response token left after truncation to max_length")
    return Dataset.from_list(examples)


# --- collation ---------------------------------------------------------------------------------


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad training batches with; padded positions are masked, so EOS serves when there is none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@dataclass
class ClassCollator:
    """Pads tokenized examples on the right (training) into tensors, keeping `token_classes`.

    Padding: `input_ids` with `pad_token_id`, `attention_mask` 0, `labels` -100, `token_classes` 0.
    Other keys of the examples are dropped.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        fill = {
            "input_ids": self.pad_token_id,
            "attention_mask": 0,
            "labels": IGNORE_INDEX,
            "token_classes": NOT_IN_LOSS,
        }
        batch = {key: torch.full((len(examples), length), value, dtype=torch.long) for key, value in fill.items()}
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            if len(e["labels"]) != n or len(e["token_classes"]) != n:
                raise HarnessError("an example's input_ids, labels and token_classes differ in length")
            batch["input_ids"][i, :n] = torch.as_tensor(e["input_ids"])
            batch["attention_mask"][i, :n] = torch.as_tensor(e["attention_mask"]) if "attention_mask" in e else 1
            batch["labels"][i, :n] = torch.as_tensor(e["labels"])
            batch["token_classes"][i, :n] = torch.as_tensor(e["token_classes"])
        return batch


# --- losses ------------------------------------------------------------------------------------


@dataclass
class ClassLossTotals:
    """Summed token losses and token counts per class; add them up over micro-batches, then `as_log`."""

    totals: torch.Tensor  # float64 [nll_format, nll_content, n_format, n_content], detached

    def __add__(self, other: ClassLossTotals) -> ClassLossTotals:
        return ClassLossTotals(self.totals + other.totals.to(self.totals.device))

    def as_log(self, prefix: str = "train_") -> dict[str, float]:
        """`{prefix}loss_format` / `{prefix}loss_content` (token means; a class with no tokens is left
        out: prose logs content only) and `{prefix}tokens_format` / `{prefix}tokens_content`."""
        nll_format, nll_content, n_format, n_content = self.totals.tolist()
        logs = {f"{prefix}tokens_format": n_format, f"{prefix}tokens_content": n_content}
        if n_format:
            logs[f"{prefix}loss_format"] = nll_format / n_format
        if n_content:
            logs[f"{prefix}loss_content"] = nll_content / n_content
        return logs


def _align(per_token: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
    """Drop leading positions the labels do not have: PEFT prompt tuning (ProMoT stage 1) prepends
    virtual tokens, so the model's outputs are longer than the labels by that many positions."""
    extra = per_token.shape[1] - shifted.shape[1]
    if extra < 0:
        raise HarnessError(f"the model returned {per_token.shape[1]} positions for {shifted.shape[1]} labels")
    return per_token[:, extra:] if extra else per_token


def _check_classes(shift_labels: torch.Tensor, shift_classes: torch.Tensor) -> None:
    if shift_classes.shape != shift_labels.shape:
        raise HarnessError(f"token_classes {tuple(shift_classes.shape)} and labels {tuple(shift_labels.shape)} differ")
    in_loss = shift_labels != IGNORE_INDEX
    if not torch.equal(in_loss, shift_classes != NOT_IN_LOSS) or not bool(
        ((shift_classes[in_loss] == FORMAT) | (shift_classes[in_loss] == CONTENT)).all()
    ):
        raise HarnessError("token_classes must be FORMAT or CONTENT exactly where labels are not -100")


def _class_sums(
    token_nll: torch.Tensor, shift_labels: torch.Tensor, shift_classes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, ClassLossTotals]:
    """From per-position losses aligned with the shifted labels: (summed loss, token count, class totals)."""
    _check_classes(shift_labels, shift_classes)
    in_loss = shift_labels != IGNORE_INDEX
    token_nll = token_nll.masked_fill(~in_loss, 0.0)
    detached = token_nll.detach().double()
    is_format, is_content = shift_classes == FORMAT, shift_classes == CONTENT
    totals = torch.stack(
        [
            detached[is_format].sum(),
            detached[is_content].sum(),
            is_format.sum().double(),
            is_content.sum().double(),
        ]
    )
    return token_nll.sum(), in_loss.sum(), ClassLossTotals(totals)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy [B, T-1]: `logits[:, t]` scored against `labels[:, t + 1]`; 0 where ignored."""
    shift_labels = labels[:, 1:]
    logits = _align(logits[:, :-1], shift_labels)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        shift_labels.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)


def class_losses(logits: torch.Tensor, labels: torch.Tensor, token_classes: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean token loss overall and per class from one set of logits [B, T, V] (causal shift applied).

    Returns `train_loss` (differentiable), `train_loss_format`, `train_loss_content` (detached; NaN for a
    class with no tokens) and the counts `n_tokens`, `n_tokens_format`, `n_tokens_content`.
    """
    token_classes = token_classes.to(labels.device)
    nll = token_losses(logits, labels)
    total, count, sums = _class_sums(nll, labels[:, 1:].to(nll.device), token_classes[:, 1:].to(nll.device))
    nll_format, nll_content, n_format, n_content = sums.totals
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=sums.totals.device)
    return {
        "train_loss": total / count.clamp(min=1),
        "train_loss_format": nll_format / n_format if n_format else nan,
        "train_loss_content": nll_content / n_content if n_content else nan,
        "n_tokens": count,
        "n_tokens_format": n_format.long(),
        "n_tokens_content": n_content.long(),
    }


def compute_loss_with_classes(
    model: Any,
    inputs: Mapping[str, Any],
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    fused_lm_head: bool = False,
) -> tuple[torch.Tensor, ClassLossTotals, Any]:
    """One forward pass: the training loss, the class totals of this batch, and the model outputs.

    `inputs` is a `ClassCollator` batch (it is not modified); `token_classes` is kept from the model.
    The loss is the summed token loss divided by `num_items_in_batch` when the Trainer passes it (the
    loss-token count of the whole accumulated batch, as transformers' and TRL's own losses do) or else by
    this batch's loss-token count. `fused_lm_head=True` is for a model patched by TRL's SFTTrainer
    (`add_fused_lm_head`): the forward returns per-token log-probabilities instead of logits.
    """
    inputs = dict(inputs)
    token_classes = inputs.pop("token_classes")
    labels = inputs["labels"]
    inputs["use_cache"] = False
    if fused_lm_head:
        outputs = model(**inputs, fused_lm_head=True)
        shift_labels = labels[:, 1:]
        nll = -_align(outputs.log_probs, shift_labels)
    else:
        del inputs["labels"]  # the loss is computed here, not a second time inside the model
        outputs = model(**inputs)
        nll = token_losses(outputs.logits, labels)
    shift_labels = labels[:, 1:].to(nll.device)
    total, count, totals = _class_sums(nll, shift_labels, token_classes[:, 1:].to(nll.device))
    if num_items_in_batch is not None:
        loss = total / torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1)
    else:
        loss = total / count.clamp(min=1)
    return loss, totals, outputs


class ClassLossMixin:
    """Mix in before a `transformers.Trainer` (or `trl.SFTTrainer`): class losses from the training forward.

    `class ClassLossSFTTrainer(ClassLossMixin, SFTTrainer): pass`. Needs batches from `ClassCollator`
    (and `remove_unused_columns=False`, or the Trainer drops `token_classes`). Every training micro-batch
    adds its class totals; the next log with `loss` gets `train_loss_format`, `train_loss_content`,
    `train_tokens_format`, `train_tokens_content` over those micro-batches (summed across processes), an
    evaluation log with `eval_loss` the `eval_` twins. `class_loss_fused_lm_head` None means: use TRL's
    fused LM head when this is an SFTTrainer (which patches the model with it).
    """

    class_loss_fused_lm_head: bool | None = None

    def _class_loss_fused(self) -> bool:
        if self.class_loss_fused_lm_head is None:
            try:
                from trl import SFTTrainer
            except ImportError:  # pragma: no cover - trl is a dependency
                return False
            self.class_loss_fused_lm_head = isinstance(self, SFTTrainer)
        return self.class_loss_fused_lm_head

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, totals, outputs = compute_loss_with_classes(
            model, inputs, num_items_in_batch=num_items_in_batch, fused_lm_head=self._class_loss_fused()
        )
        # As transformers' Trainer.compute_loss: num_items_in_batch counts the tokens of every process.
        if (
            getattr(self.args, "average_tokens_across_devices", False)
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
            and num_items_in_batch is not None
        ):
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            loss = loss * (self.accelerator.num_processes // tp_size)
        mode = "train" if model.training else "eval"
        pending = self.__dict__.setdefault("_class_loss_pending", {})
        pending[mode] = totals if mode not in pending else pending[mode] + totals
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        pending = self.__dict__.setdefault("_class_loss_pending", {})
        for mode, key, prefix in (("train", "loss", "train_"), ("eval", "eval_loss", "eval_")):
            if key in logs and mode in pending:
                totals = pending.pop(mode).totals
                if self.accelerator.num_processes > 1:
                    totals = self.accelerator.reduce(totals.to(self.accelerator.device), reduction="sum")
                logs = {**logs, **ClassLossTotals(totals).as_log(prefix)}
        return super().log(logs, *args, **kwargs)
