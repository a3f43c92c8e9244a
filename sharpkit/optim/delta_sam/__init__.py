"""delta-SAM: SAM with dynamic reweighting (Zhou, Liu, Zhang, Chen, 2022).

What is the paper's and what is sharpkit's:

- **The paper's** (Zhou et al., Findings of EMNLP 2022): approximate the
  per-instance adversarial perturbation, which costs one backward pass per
  example, by ONE reweighted batch perturbation,
  ``g_lam = sum_i lam_i g_i``, ``e = rho g_lam / ||g_lam||``,
  ``G = grad L_B(w + e)``; instances that the shared perturbation leaves
  unguarded get larger weights; guardedness is estimated cheaply with a few
  extra forward passes under random Gaussian perturbations.
- **sharpkit's reconstruction** (the paper's exact weighting formula is not
  available to this project): the weighting is a replaceable function of
  per-example statistics (:class:`ExampleStats`), and the default
  (:class:`UnguardednessSoftmax`) is built from the first-order picture
  ``u_i = 1 - (g_i . e_SAM) / (rho ||g_i||) = 1 - cos(g_i, g)``,
  ``lam = softmax(u / tau)``; ``tau -> inf`` recovers SAM. The statistics come
  exactly (per-example gradients, ``torch.func``) or from random forward probes.

The package holds the optimizer (:mod:`.optimizer`), the weightings
(:mod:`.weighting`) and the statistics modes (:mod:`.statistics`). The
per-example measurements (per-example gradients, the per-instance target
``G_PI``, perturbation cosines) are in :mod:`sharpkit.per_example`.
"""

from .optimizer import DeltaSAM
from .statistics import MODES
from .weighting import (
    ExampleStats,
    InverseNormWeights,
    UnguardednessSoftmax,
    UniformWeights,
    Weighting,
)

__all__ = [
    "MODES",
    "DeltaSAM",
    "ExampleStats",
    "InverseNormWeights",
    "UnguardednessSoftmax",
    "UniformWeights",
    "Weighting",
]
