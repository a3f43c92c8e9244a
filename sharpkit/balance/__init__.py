"""sharpkit.balance (in progress)."""
