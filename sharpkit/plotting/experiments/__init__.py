"""Figures of the claim experiments, one module per experiment (no computation here)."""
