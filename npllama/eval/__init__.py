"""Zero- and few-shot evaluation, the Llama paper's way.

`scoring.py` scores items of three kinds (multiple choice, partial, generation) and knows no
benchmark; `tasks.py` turns each benchmark's published rows into items and reads local tasks;
`report.py` evaluates one task and makes the table; `datasets.py` fetches the benchmarks' data
(`python -m npllama.eval.datasets download`); `lmeval.py` serves lm-evaluation-harness from the same
scoring; `__main__.py` is `python -m npllama.eval`.
"""
