"""Loss landscapes: directions, 1-D/2-D surfaces, checkpoint interpolation, trajectories.

- :func:`filter_normalized_direction` (Li et al., 2018), :func:`hessian_directions`,
  :func:`pca_directions` (of a training trajectory) and :func:`project_onto`.
- :func:`loss_surface_1d`, :func:`loss_surface_2d`, :func:`interpolate_checkpoints`
  return a :class:`Surface`; plot with :mod:`sharpkit.plotting.landscape`.
"""

from sharpkit.landscape.directions import (
    Direction,
    filter_normalized_direction,
    hessian_directions,
    pca_directions,
    project_onto,
)
from sharpkit.landscape.surface import (
    Surface,
    interpolate_checkpoints,
    loss_surface_1d,
    loss_surface_2d,
)

__all__ = [
    "Direction",
    "Surface",
    "filter_normalized_direction",
    "hessian_directions",
    "interpolate_checkpoints",
    "loss_surface_1d",
    "loss_surface_2d",
    "pca_directions",
    "project_onto",
]
