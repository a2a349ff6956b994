"""pass@k evaluation of model directories on benchmark files (tools/evaluate.py is its command line)."""
