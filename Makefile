# The two commands of the README. Both set up ./.venv first (a no-op once it is current).
.PHONY: demo test env
env:
	@bash tools/setup_env.sh

demo: env
	.venv/bin/python examples/pretrain_s2l.py

test: env
	.venv/bin/python -m pytest
