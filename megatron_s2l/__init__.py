"""megatron-s2l: GRPO on Megatron-Core with a frozen smaller explorer (S2L-PO)."""

__version__ = "0.1.0"
