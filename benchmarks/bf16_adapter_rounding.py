"""How much of a LoRA update survives when the adapter itself is stored in bfloat16 (CPU, seconds).

TRL's SFTTrainer casts a 4-bit model's LoRA weights to bfloat16, and AdamW then updates them in place. This replays
Study B's schedule on one `lora_A` / `lora_B` pair of a 1536-wide layer (Qwen2.5-1.5B's hidden size, rank 16, PEFT's
initialisation: Kaiming-uniform A, zero B): 90 AdamW steps, cosine with 5 warm-up steps, gradients a fixed
direction plus unit noise. It prints, for each learning rate, the share of `lora_A` entries that never moved and
the norm of the bfloat16 update over the float32 one (docs/results/study_b_qlora_qwen2.5-coder-1.5b.md, finding 2).

    python benchmarks/bf16_adapter_rounding.py
"""

from __future__ import annotations

import math

import torch


def updates(dtype: torch.dtype, lr: float, steps: int = 90, warmup: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    a = torch.empty(16, 1536)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    b = torch.zeros(1536, 16)
    pa, pb = torch.nn.Parameter(a.clone().to(dtype)), torch.nn.Parameter(b.clone().to(dtype))  # a, b stay as they began
    optimizer = torch.optim.AdamW([pa, pb], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: s / warmup if s < warmup else
                                                 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))))
    noise = torch.Generator().manual_seed(1)
    drift_a, drift_b = torch.randn(16, 1536, generator=noise), torch.randn(1536, 16, generator=noise)
    for _ in range(steps):
        pa.grad = (drift_a + torch.randn(16, 1536, generator=noise)).to(dtype)
        pb.grad = (drift_b + torch.randn(1536, 16, generator=noise)).to(dtype)
        optimizer.step()
        schedule.step()
    return pa.detach().float() - a.to(dtype).float(), pb.detach().float() - b


def main() -> None:
    for lr in (5e-5, 2e-4):  # Study B's learning rate, and the QLoRA paper's
        full_a, full_b = updates(torch.float32, lr)
        half_a, half_b = updates(torch.bfloat16, lr)
        print(f"lr {lr:g}: lora_A entries that never moved in bf16 {(half_a == 0).float().mean():.3f} "
              f"(fp32 {(full_a == 0).float().mean():.3f}); update norm bf16/fp32: lora_A "
              f"{half_a.norm() / full_a.norm():.3f}, lora_B {half_b.norm() / full_b.norm():.3f}")


if __name__ == "__main__":
    main()
