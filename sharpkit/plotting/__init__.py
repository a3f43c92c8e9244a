"""Figures for sharpkit's results; no computation here.

Import the submodule you need (each pulls in matplotlib, and some seaborn):

- :mod:`sharpkit.plotting.curvature`: Hessian spectral densities.
- :mod:`sharpkit.plotting.landscape`: 1-D and 2-D loss landscapes.
- :mod:`sharpkit.plotting.sharpness`: metrics over a training run.
- :mod:`sharpkit.plotting.balance`: balancedness over steps.
- :mod:`sharpkit.plotting.experiments`: the claims experiments' figures.
"""
