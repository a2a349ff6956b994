"""Launchers: Slurm and NeMo-Run."""
