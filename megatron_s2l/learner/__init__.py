"""The Megatron-Core learner: model provider, CPU shims, train step, checkpoints, HF weight mapping."""
