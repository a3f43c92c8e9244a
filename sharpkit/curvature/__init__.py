"""sharpkit.curvature (in progress)."""
