"""Evaluation tools for fla models (see the README's "Evaluation" section).

- ``evals.harness``: lm-eval-harness with fla models registered (``fla`` and ``hf`` backends), offline RULER NIAH;
- ``evals.ruler_offline``: the local-corpus haystack and regex sentence splitter for lm-eval's RULER tasks;
- ``evals.ppl``: perplexity overall and by position, JSON / CSV / PNG;
- ``evals.recall``: synthetic multi-query associative recall and needle retrieval, accuracy per length;
- ``evals.reference_models``: models with known answers (uniform, oracle, induction head) for checking the above.

Importing ``evals`` imports nothing heavy; each tool imports lm-eval / matplotlib only when it needs them.
"""
