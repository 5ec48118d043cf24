"""calc: the margin engine. A fill or tick becomes a margin number in calc/engine.py (MarginEngine),
via the numba kernels in calc/kernels.py; the model math itself is calc/models.py.

Modules: history (price history, returns, covariances), models (reference numpy models, normal
quantile, stress, drivers, external-model registry), kernels (incremental numba state), engine
(streaming state, margin/alert rows, what-if), alerts (rules with hysteresis), oneshot (`marginflow
margin`), span/ (SPAN from a CCP parameter file).
"""
