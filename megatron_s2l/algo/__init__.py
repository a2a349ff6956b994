"""Pure tensor math: schedule, advantages, losses, log-probs, rewards. Imports neither Megatron nor vLLM."""
