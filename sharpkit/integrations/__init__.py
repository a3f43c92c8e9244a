"""Integrations with other libraries' training loops (each an optional import).

- :mod:`sharpkit.integrations.trainer`: SAM-family optimizers inside
  ``transformers.Trainer`` (:class:`~sharpkit.integrations.trainer.SAMTrainer`).

Importing this package imports nothing heavy; ``transformers`` is needed only
when :mod:`sharpkit.integrations.trainer` is imported.
"""

__all__ = ["trainer"]
