"""Gradient auditing: `gradcheck.py` compares a backward with finite differences (the tests use it
too), `ops.py` audits every op of npllama and the whole model with it, `compare.py` checks another
implementation's gradients against npllama's float64 reference; `__main__.py` is
`python -m npllama.audit [compare | reference]`."""
