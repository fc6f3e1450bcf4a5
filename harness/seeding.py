"""Seeding a fine-tune's RNGs before anything random is drawn (issue 19).

The Trainer seeds itself (`TrainingArguments.seed`) only when it is constructed, which is *after* the LoRA
adapter is created: peft draws `lora_A`'s starting weights from the global torch RNG, so without seeding
first the same seed gave a different adapter depending on what the process had done before (a rerun that
skips stage 1 or the base evaluation trained another fine-tune). Every training entry point calls
`seed_everything` before it creates its trainable weights.
"""

from __future__ import annotations

from transformers import set_seed


def seed_everything(seed: int) -> None:
    """Seed python's `random`, numpy, torch and every CUDA device with `seed` (transformers' `set_seed`)."""
    set_seed(seed)
