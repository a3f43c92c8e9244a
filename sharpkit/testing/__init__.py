"""sharpkit.testing (in progress)."""
