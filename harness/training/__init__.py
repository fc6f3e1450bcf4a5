"""The training stage: one recipe per training method (`methods`: SFT, ProMoT), the trainers behind them
(`sft`, `promot`), loss classes, the fast training path and per-epoch checkpoints."""
