"""sharpkit.sharpness (in progress)."""
