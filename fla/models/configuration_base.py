"""``FLAConfig``: the ``PretrainedConfig`` base of every family's config (what they all set the same way)."""

from __future__ import annotations

from typing import Any, Optional

from transformers import PretrainedConfig


class FLAConfig(PretrainedConfig):
    """A family's config stores its own fields, then calls ``init_base`` with the token ids, the tying flag and the
    unknown keys (kept as attributes, as transformers does)."""

    def init_base(self, pad_token_id: Optional[int], bos_token_id: Optional[int], eos_token_id: Optional[int],
                  tie_word_embeddings: bool, **kwargs: Any) -> None:
        # set here as well as in the base class: transformers 5 keeps token ids and tying out of its base fields
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.tie_word_embeddings = tie_word_embeddings
        PretrainedConfig.__init__(self, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                                  eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)
