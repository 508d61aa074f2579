"""Language models whose answers are known, for checking evaluation code (``evals.ppl``, ``evals.recall``).

Each is an ``nn.Module`` called like a transformers causal LM, ``model(input_ids=[B, T], **ignored)``, returning an
object with ``.logits`` ``[B, T, vocab_size]`` float32 (position ``t`` scores token ``t + 1``):

- ``UniformLM(V)``: all logits equal; cross-entropy is ``log V`` at every position (perplexity exactly ``V``), and the
  argmax is always token 0.
- ``PeekingOracleLM(V)``: cheats by reading the next input token; position ``t`` puts ``margin`` on
  ``input_ids[t + 1]`` (the last position on token 0). Perplexity ~1 on any text, 100% on any teacher-forced task.
- ``InductionOracleLM(V)``: causal and honest: predicts the token that followed the most recent earlier occurrence of
  the current token (token 0 when there is none). It solves associative recall and needle retrieval exactly when the
  task is well formed (keys unique in the context and the answer stated there), so it checks the task generators.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn as nn


class _ReferenceLM(nn.Module):
    def __init__(self, vocab_size: int, margin: float = 100.0) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size={vocab_size}: must be >= 2")
        self.vocab_size = vocab_size
        self.margin = margin
        self.config = SimpleNamespace(vocab_size=vocab_size)
        # a buffer gives the module a device (evaluation code moves inputs to it)
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)

    def _one_hot(self, targets: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*targets.shape, self.vocab_size, device=targets.device)
        return logits.scatter_(-1, targets.unsqueeze(-1), self.margin)

    def forward(self, input_ids: torch.Tensor, **kwargs) -> SimpleNamespace:
        return SimpleNamespace(logits=self.predict(input_ids))

    def predict(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class UniformLM(_ReferenceLM):
    """Equal logits for every token (see the module docstring)."""

    def predict(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, self.vocab_size, device=input_ids.device)


class PeekingOracleLM(_ReferenceLM):
    """Always right, by reading the next input token (see the module docstring)."""

    def predict(self, input_ids: torch.Tensor) -> torch.Tensor:
        nxt = torch.cat([input_ids[:, 1:], input_ids.new_zeros(input_ids.shape[0], 1)], dim=1)
        return self._one_hot(nxt)


class InductionOracleLM(_ReferenceLM):
    """A perfect induction head: ``... a b ... a -> b`` (see the module docstring)."""

    def predict(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._one_hot(self._causal_induction(input_ids))

    @staticmethod
    def _causal_induction(input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        out = torch.zeros(B, T, dtype=torch.long, device=input_ids.device)
        for b in range(B):
            row = input_ids[b].tolist()
            follower = {}  # token -> the token that followed its latest occurrence before position t
            pred = [0] * T
            for t in range(T):
                if t >= 1:
                    follower[row[t - 1]] = row[t]
                pred[t] = follower.get(row[t], 0)
            out[b] = torch.tensor(pred, device=input_ids.device)
        return out
