"""sharpkit.landscape (in progress)."""
