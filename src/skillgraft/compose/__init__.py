"""Learned composition: merge coefficients fitted from a few examples (``learn``) and searches over merge recipes
(``evolve``), both producing a plain merge YAML that ``skillgraft merge`` reproduces.
"""
