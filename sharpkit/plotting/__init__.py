"""sharpkit.plotting (in progress)."""
