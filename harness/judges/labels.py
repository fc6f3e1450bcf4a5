"""Judge answers read from next-token probabilities, not parsed from free text.

A classifier judge (HarmBench's "Yes"/"No", Llama Guard's "safe"/"unsafe", a rubric's digit 1-5) answers with one
label. Generating text and parsing it fails whenever the model words its answer differently (the 1.5B model
judging Study B answered in an unreadable form 89% of the time). Reading the probabilities of the label tokens
at the answer position cannot fail: the verdict is the most probable label, and the probabilities give a
continuous score (for ROC AUC and for choosing a threshold on a calibration split).

`LabelReader` runs the forward pass on a local transformers model: prompts are the judge's own raw text (its
published format, special tokens included), batched with left padding and explicit position ids so that a padded
prompt gets exactly the logits it gets alone. A label's probability is the sum over the first tokens of its
spellings ("Yes", " Yes"); labels that share a first token cannot be told apart and are refused at build time.
`mass` (how much of the whole next-token distribution the labels hold) is kept as the audit trail: a low mass
means the model was about to say something else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from harness import faults
from harness.errors import HarnessError
from harness.training.loss_classes import pad_token_id


@dataclass(frozen=True)
class LabelProbabilities:
    """The labels' probabilities at one answer position, normalised over the labels, and their raw mass."""

    probabilities: dict[str, float]
    mass: float
    """Share of the full next-token distribution on the label tokens (1.0: the model answers only in labels)."""

    @property
    def label(self) -> str:
        """The most probable label (the first listed wins a tie)."""
        return max(self.probabilities, key=self.probabilities.__getitem__)

    def audit(self) -> str:
        """One line for the per-prompt table: each label's probability and the mass."""
        shown = " ".join(f"{label}={p:.3f}" for label, p in self.probabilities.items())
        return f"{shown} (mass {self.mass:.3f})"


class LabelReader:
    """Next-token label probabilities (and short greedy continuations) of raw prompts on a local model."""

    def __init__(self, model, tokenizer, *, batch_size: int = 8, name: str = "judge"):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.name = name

    def label_tokens(self, labels: Sequence[str]) -> dict[str, list[int]]:
        """Each label's candidate first tokens: the label as written and with a leading space (tokenizers differ in
        whether the answer's first token carries the space). One-line error when two labels share a token, or a
        label has no token."""
        owner: dict[int, str] = {}
        tokens: dict[str, list[int]] = {}
        for label in labels:
            ids = []
            for spelling in (label, " " + label):
                encoded = self.tokenizer.encode(spelling, add_special_tokens=False)
                # A first token that is only the space (" 1" -> " ", "1") says nothing about which label follows.
                first = self.tokenizer.decode(encoded[:1]).strip() if encoded else ""
                if first and label.startswith(first) and encoded[0] not in ids:
                    ids.append(encoded[0])
            if not ids:
                raise HarnessError(f"judge '{self.name}': the label {label!r} has no token in this tokenizer")
            for token in ids:
                if owner.setdefault(token, label) != label:
                    piece = self.tokenizer.convert_ids_to_tokens(token)
                    raise HarnessError(f"judge '{self.name}': the labels {owner[token]!r} and {label!r} both start with "
                                       f"the token {piece!r}; their probabilities cannot be told apart with this "
                                       "tokenizer")
            tokens[label] = ids
        return tokens

    def encode(self, prompt: str) -> list[int]:
        """A prompt's token ids: a prompt that writes its own BOS (Llama Guard's chat text) gets no second one."""
        bos = self.tokenizer.bos_token
        own_bos = bool(bos) and prompt.startswith(bos)
        return self.tokenizer.encode(prompt, add_special_tokens=not own_bos)

    def probabilities(self, prompts: Sequence[str], labels: Sequence[str]) -> list[LabelProbabilities]:
        """For each prompt, the labels' probabilities as its next token, in prompt order."""
        import torch

        tokens = self.label_tokens(labels)
        encoded = [self.encode(prompt) for prompt in prompts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths pad little
        results: list[LabelProbabilities | None] = [None] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            logits = self._last_logits([encoded[i] for i in batch])
            distribution = torch.softmax(logits.float(), dim=-1)
            for row, index in enumerate(batch):
                raw = {label: float(distribution[row, ids].sum()) for label, ids in tokens.items()}
                mass = sum(raw.values())
                normalised = {label: (p / mass if mass > 0 else 1.0 / len(raw)) for label, p in raw.items()}
                results[index] = LabelProbabilities(normalised, mass)
            faults.reached("judge_batch")  # a test's SIGKILL here falls between two judged batches
        return results  # type: ignore[return-value]

    def _left_padded(self, batch: list[list[int]]):
        """(input_ids, attention_mask) of token lists padded on the left, on the model's device."""
        import torch

        pad = pad_token_id(self.tokenizer)
        width = max(len(ids) for ids in batch)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        return input_ids, attention

    def _last_logits(self, batch: list[list[int]]):
        """Logits at each prompt's last position; left padding with position ids counted from each prompt's start."""
        import torch

        input_ids, attention = self._left_padded(batch)
        inputs = {"input_ids": input_ids, "attention_mask": attention,
                  "position_ids": (attention.cumsum(-1) - 1).clamp(min=0)}
        with torch.inference_mode():
            try:  # only the last position's logits: the full vocabulary at every position costs gigabytes
                out = self.model(**inputs, logits_to_keep=1)
            except TypeError:  # a model class without `logits_to_keep`
                out = self.model(**inputs)
        return out.logits[:, -1, :]

    def continue_greedy(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Short greedy continuations of raw prompts (Llama Guard's category line, WildGuard's three answers)."""
        import torch

        texts = []
        for start in range(0, len(prompts), self.batch_size):
            input_ids, attention = self._left_padded([self.encode(p) for p in prompts[start:start + self.batch_size]])
            with torch.inference_mode():
                out = self.model.generate(input_ids=input_ids, attention_mask=attention, do_sample=False,
                                          max_new_tokens=max_new_tokens, pad_token_id=pad_token_id(self.tokenizer))
            texts += self.tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
        return texts


def clip_tokens(tokenizer, text: str, limit: int) -> str:
    """`text` cut to its first `limit` tokens (a judge reads a bounded reply: HarmBench's 512, the trained judge's
    384); unchanged when it is shorter."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return text if len(ids) <= limit else tokenizer.decode(ids[:limit], skip_special_tokens=True)


def expected_score(probabilities: LabelProbabilities) -> float:
    """The expected value of a numeric label (a rubric's 1-5) under the label probabilities."""
    return sum(int(label) * p for label, p in probabilities.probabilities.items())
