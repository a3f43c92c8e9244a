"""sharpkit.experiments (in progress)."""
