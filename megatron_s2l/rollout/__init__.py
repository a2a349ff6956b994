"""Rollout engines (vLLM explorer and learner), weight refit, offline explorer caches, the S2L group mixer."""
