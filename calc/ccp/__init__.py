"""CCP-style VaR models (issue #14 items 4 and 5): a model spec per [[calc.ccp_models]] entry
(presets.py), its scenario sets from a price history (scenarios.py), a portfolio's scenario P&L per set
with full revaluation of options (portfolio.py) and the margin with its components (margin.py).
What each preset follows and where it may differ from the CCP: calc/FEATURES.md.
"""
