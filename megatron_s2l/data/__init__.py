"""Prompt datasets and the synthetic verifiable task of the CPU demo."""
