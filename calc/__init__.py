"""calc: the margin engine. A fill or tick becomes a margin number in calc/engine.py (MarginEngine),
via the numba kernels in calc/kernels.py; the model math itself is calc/models.py.

Modules, one job each: events (tickerplant batches -> engine, for calc and the backtest), engine
(events -> state -> rows), state (the kernels' state laid out for the accounts), kernels (incremental
numba kernels), margin_rows (margin and alert rows), external (accounts on external models: SPAN),
reference (the full recompute), drivers, band (price acceptance), whatif, inputs and history (accounts,
positions, prices, covariances), models (reference numpy models, stress), alerts (rules with
hysteresis), params and prices (param events and their commands), server and api (the process and its
websocket protocol), warm (compile the kernels), oneshot (`marginflow margin`), span/ (SPAN).
"""
