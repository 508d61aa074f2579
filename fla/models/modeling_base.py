"""The transformer skeleton every model family shares: block, pretrained-model base, backbone and causal LM head.

A family supplies its config class, its block (a ``FLABlock`` subclass whose ``build_mixer`` returns the token
mixer of a layer) and thin ``FLAModel`` / ``FLAForCausalLM`` subclasses naming them; everything else is here.

    FLAModel:        embeddings -> layers (blocks) -> norm
    FLABlock:        x + mixer(attn_norm(x)), then + mlp(mlp_norm(.)) with the residual add fused into mlp_norm
    FLAForCausalLM:  FLAModel + lm_head, loss with labels shifted inside, generate() through FLAGenerationMixin

Config fields read here (all families have them): vocab_size, hidden_size, num_hidden_layers, norm_eps,
hidden_ratio, intermediate_size, hidden_act, pad_token_id, initializer_range, tie_word_embeddings, use_cache,
fuse_norm, fuse_swiglu, fuse_cross_entropy, fuse_linear_cross_entropy, use_l2warp; optional:
prenorm_residual_strategy (None, 'rescale' or 'zero').

State-dict keys (FLA's): ``model.embeddings.weight``, ``model.layers.{i}.attn_norm.weight``,
``model.layers.{i}.attn.*`` (the mixer), ``model.layers.{i}.mlp_norm.weight``,
``model.layers.{i}.mlp.{gate,up,down}_proj.weight``, ``model.norm.weight``, ``lm_head.weight``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from fla.layers.utils import padding_mask
from fla.models.utils import Cache, FLAGenerationMixin
from fla.modules import FusedCrossEntropyLoss, FusedLinearCrossEntropyLoss, GatedMLP, RMSNorm

PRENORM_RESIDUAL_STRATEGIES = (None, "rescale", "zero")


@dataclass
class FLAModelOutput(BaseModelOutputWithPast):
    """``BaseModelOutputWithPast`` plus ``routing_stats``: what the mixers returned besides their output (LTE layers:
    one ``fla.layers.lte_router.RoutingStats`` each, for the L1 regulariser), in layer order; None when none did."""

    routing_stats: Optional[List[Any]] = None


@dataclass
class FLACausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``routing_stats`` (see ``FLAModelOutput``)."""

    routing_stats: Optional[List[Any]] = None


def build_norm(config, hidden_size: Optional[int] = None) -> nn.Module:
    """The block / final norm: fla's RMSNorm (fused residual add) with ``fuse_norm``, else ``torch.nn.RMSNorm``
    (plain torch, e.g. for tensor-parallel plans). Both have one parameter, ``weight``."""
    size = config.hidden_size if hidden_size is None else hidden_size
    if getattr(config, "fuse_norm", True):
        return RMSNorm(size, eps=config.norm_eps)
    return nn.RMSNorm(size, eps=config.norm_eps)


def build_attention(config, layer_idx: int, spec: Optional[dict] = None) -> nn.Module:
    """An ``fla.layers.Attention`` mixer for layer ``layer_idx``. Its head layout, bias, qk norm, window and RoPE base
    come from ``spec`` (a hybrid's ``attn`` dict) or, without one, from the config's own fields (Transformer);
    hidden size, ``max_position_embeddings`` and ``norm_eps`` always from the config."""
    from fla.layers.attn import Attention

    def field(name, default=None):
        return spec.get(name, default) if spec is not None else getattr(config, name, default)

    return Attention(
        hidden_size=config.hidden_size,
        num_heads=field("num_heads"),
        num_kv_heads=field("num_kv_heads"),
        qkv_bias=field("qkv_bias", False),
        qk_norm=field("qk_norm", False),
        window_size=field("window_size"),
        rope_theta=field("rope_theta", 10000.0),
        max_position_embeddings=config.max_position_embeddings,
        layer_idx=layer_idx,
        norm_eps=config.norm_eps,
    )


class FLABlock(GradientCheckpointingLayer):
    """Pre-norm block: ``h = x + attn(attn_norm(x))``; ``out = h + mlp(mlp_norm(h))``.

    Subclasses implement ``build_mixer(config, layer_idx)``; the mixer is stored as ``attn`` (FLA's name, whatever
    the mixer is) and follows the ``fla.layers`` calling convention.
    """

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.attn_norm = build_norm(config)
        self.attn = self.build_mixer(config, layer_idx)
        self.mlp_norm = build_norm(config)
        self.mlp = GatedMLP(
            hidden_size=config.hidden_size,
            hidden_ratio=config.hidden_ratio,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            fuse_swiglu=getattr(config, "fuse_swiglu", True),
        )

    def build_mixer(self, config, layer_idx: int) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} must implement build_mixer(config, layer_idx)")

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[Cache] = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        **kwargs: Any,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[Cache]]:
        residual = hidden_states
        hidden_states = self.attn_norm(hidden_states)
        hidden_states, attentions, past_key_values = self.attn(
            hidden_states,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
            **kwargs,
        )
        if isinstance(self.mlp_norm, RMSNorm):
            hidden_states, residual = self.mlp_norm(hidden_states, residual, prenorm=True)
        else:
            hidden_states = residual + hidden_states
            residual = hidden_states
            hidden_states = self.mlp_norm(hidden_states)
        hidden_states = residual + self.mlp(hidden_states, **kwargs)
        return hidden_states, attentions, past_key_values


class FLAPreTrainedModel(PreTrainedModel):
    """Weight initialisation and HF plumbing shared by all families.

    ``_init_weights`` (run children-first by ``post_init``, also after meta-device construction + ``to_empty``):
    Linear and Conv1d (incl. ``ShortConvolution``) weights ~ N(0, initializer_range), biases 0; embeddings
    ~ N(0, initializer_range) with the padding row 0; every other module with ``reset_parameters`` uses it (norms:
    1; Gated DeltaNet: its A_log / dt_bias draws; buffer-only modules such as ``RotaryEmbedding``: their buffers).
    With ``config.prenorm_residual_strategy='rescale'`` the ``o_proj`` / ``down_proj`` weights are redrawn
    Kaiming-uniform / sqrt(2 * num_hidden_layers) ('zero': zeros).
    Parameters transformers marks as loaded (``_is_hf_initialized``) are never overwritten.
    """

    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    # recurrent states cannot be rolled back: generate() refuses assisted decoding, and on transformers 4.57 it does
    # not pre-build a DynamicCache (the model builds its own Cache)
    _is_stateful = True
    _supports_cache_class = True
    _skip_keys_device_placement = ["past_key_values"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        own = dict(module.named_parameters(recurse=False))
        if not own:
            # buffer-only modules (RotaryEmbedding's inv_freq): recompute what meta construction + to_empty left
            # as uninitialised memory
            if hasattr(module, "reset_parameters") and next(module.parameters(), None) is None:
                module.reset_parameters()
            return
        if all(getattr(p, "_is_hf_initialized", False) for p in own.values()):
            return
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            strategy = self._residual_strategy() if isinstance(module, nn.Linear) else None
            if strategy is not None and self._is_residual_projection(module):
                if strategy == "rescale":
                    scale = math.sqrt(2 * self.config.num_hidden_layers)  # two residual branches per layer
                    _draw(module.weight, lambda p: nn.init.kaiming_uniform_(p, a=math.sqrt(5)).div_(scale))
                else:
                    _draw(module.weight, lambda p: p.zero_())
            else:
                _draw(module.weight, lambda p: p.normal_(mean=0.0, std=std))
            if module.bias is not None:
                _draw(module.bias, lambda p: p.zero_())
        elif isinstance(module, nn.Embedding):
            _draw(module.weight, lambda p: p.normal_(mean=0.0, std=std))
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                module.weight[module.padding_idx].zero_()
        elif hasattr(module, "reset_parameters"):
            # keep what a loader already filled: reset, then put the loaded values back
            loaded = {name: p.detach().clone() for name, p in own.items() if getattr(p, "_is_hf_initialized", False)}
            module.reset_parameters()
            for name, value in loaded.items():
                own[name].copy_(value)

    def _residual_strategy(self) -> Optional[str]:
        strategy = getattr(self.config, "prenorm_residual_strategy", None)
        if strategy not in PRENORM_RESIDUAL_STRATEGIES:
            raise ValueError(f"prenorm_residual_strategy={strategy!r}; choose one of {PRENORM_RESIDUAL_STRATEGIES}")
        return strategy

    def _is_residual_projection(self, module: nn.Module) -> bool:
        """Whether ``module`` is an ``o_proj`` / ``down_proj``: the projections that write into the residual stream."""
        return any(m is module for name, m in self.named_modules()
                   if name.rsplit(".", 1)[-1] in ("o_proj", "down_proj"))


def _draw(param: torch.Tensor, fill) -> None:
    """Fill ``param`` in place unless a loader already filled it (transformers' ``_is_hf_initialized`` flag)."""
    if not getattr(param, "_is_hf_initialized", False):
        fill(param)


class FLAModel(FLAPreTrainedModel):
    """Backbone: ``embeddings`` -> ``layers`` (``block_class`` per layer) -> ``norm``.

    ``forward(input_ids=None, attention_mask=None, inputs_embeds=None, past_key_values=None, use_cache=None,
    output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs)`` returns
    ``BaseModelOutputWithPast``. ``attention_mask`` is a [B, T'] 0/1 padding mask (T' = past + new tokens when
    decoding), checked once and handed to the blocks as its last T columns, or as None when those hold no padding;
    ``kwargs`` (e.g. ``cu_seqlens``, ``position_ids``) reach every block.
    """

    block_class: type = FLABlock

    def __init__(self, config) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([self.block_class(config, layer_idx)
                                     for layer_idx in range(config.num_hidden_layers)])
        self.norm = build_norm(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        past_key_values: Optional[Union[Cache, Tuple]] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> Union[Tuple, BaseModelOutputWithPast]:
        if output_attentions:
            warnings.warn(f"{type(self).__name__} does not return attention weights; output_attentions is ignored",
                          stacklevel=2)
            output_attentions = False
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else getattr(self.config, "output_hidden_states", False))
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids must be [batch, time], got shape {list(input_ids.shape)}")
            inputs_embeds = self.embeddings(input_ids)
        if use_cache:
            past_key_values = Cache.coerce(past_key_values)
        elif past_key_values is not None and not isinstance(past_key_values, Cache):
            past_key_values = Cache.coerce(past_key_values)

        hidden_states = inputs_embeds
        # every token mixer reads only the last T columns of the padding mask, and none when they hold no padding:
        # check it once here (one host read per forward) instead of once per layer (one per layer and decode step)
        attention_mask = padding_mask(attention_mask, hidden_states.shape[0], hidden_states.shape[1],
                                      kwargs.get("cu_seqlens"))
        all_hidden_states: Optional[List[torch.Tensor]] = [] if output_hidden_states else None
        routing_stats: List[Any] = []
        for layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states.append(hidden_states)
            hidden_states, aux, past_key_values = layer(
                hidden_states,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                use_cache=use_cache,
                output_attentions=output_attentions,
                **kwargs,
            )
            if aux is not None:
                routing_stats.append(aux)
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states.append(hidden_states)

        past = past_key_values if use_cache else None
        hidden = tuple(all_hidden_states) if all_hidden_states is not None else None
        if not return_dict:
            return tuple(x for x in (hidden_states, past, hidden) if x is not None)
        return FLAModelOutput(last_hidden_state=hidden_states, past_key_values=past, hidden_states=hidden,
                              attentions=None, routing_stats=routing_stats or None)


class FLAForCausalLM(FLAPreTrainedModel, FLAGenerationMixin):
    """Causal LM: ``model`` (a ``model_class`` backbone) + ``lm_head`` (no bias; tied to the embeddings when
    ``config.tie_word_embeddings``).

    Loss (when ``labels`` [B, T] are given; they are shifted left inside, -100 = ignored): ``self.criterion`` if
    set from outside (flame assigns a ``FusedLinearCrossEntropyLoss``), else ``FusedLinearCrossEntropyLoss`` when
    training with ``config.fuse_linear_cross_entropy``, else ``FusedCrossEntropyLoss`` with
    ``config.fuse_cross_entropy``, else ``nn.CrossEntropyLoss``. A ``FusedLinearCrossEntropyLoss`` never
    materialises the logits: ``logits`` is then None. The default ``FusedCrossEntropyLoss`` runs with
    ``inplace_backward=True`` (as FLA): on CUDA its backward writes the logits' gradient into the returned logits,
    so read them before calling ``backward``.

    ``logits_to_keep``: 0 = logits at every position; an int k > 0 = the last k positions; a 1-D index tensor =
    those positions. The loss always covers every position.
    """

    model_class: type = FLAModel
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config) -> None:
        super().__init__(config)
        self.model = self.model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.criterion: Optional[nn.Module] = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def get_decoder(self) -> FLAModel:
        return self.model

    def set_decoder(self, decoder: FLAModel) -> None:
        self.model = decoder

    def _default_criterion(self) -> nn.Module:
        if getattr(self.config, "fuse_linear_cross_entropy", False) and self.training:
            return FusedLinearCrossEntropyLoss(use_l2warp=getattr(self.config, "use_l2warp", False))
        if getattr(self.config, "fuse_cross_entropy", True):
            return FusedCrossEntropyLoss(inplace_backward=True)
        return nn.CrossEntropyLoss()

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        past_key_values: Optional[Union[Cache, Tuple]] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        **kwargs: Any,
    ) -> Union[Tuple, CausalLMOutputWithPast]:
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, torch.Tensor)) \
                or (isinstance(logits_to_keep, int) and logits_to_keep < 0):
            raise ValueError(f"logits_to_keep must be an int >= 0 or an index tensor, got {logits_to_keep!r}")
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep

        loss, logits = None, None
        if labels is None:
            logits = self.lm_head(hidden_states if isinstance(logits_to_keep, int) and logits_to_keep == 0
                                  else hidden_states[:, keep])
        else:
            criterion = self.criterion if self.criterion is not None else self._default_criterion()
            ignore_index = getattr(criterion, "ignore_index", -100)
            labels = labels.to(hidden_states.device)
            if labels.shape != hidden_states.shape[:2]:
                raise ValueError(f"labels must have shape {list(hidden_states.shape[:2])} (batch, time), "
                                 f"got {list(labels.shape)}")
            # position t predicts token t + 1; the last position predicts nothing
            labels = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], dim=1)
            if isinstance(criterion, FusedLinearCrossEntropyLoss):
                loss = criterion(hidden_states, labels, self.lm_head.weight, self.lm_head.bias)
            else:
                all_logits = self.lm_head(hidden_states)
                loss = criterion(all_logits.reshape(labels.numel(), -1), labels.reshape(-1))
                if getattr(self.config, "use_l2warp", False):
                    loss = l2_warp(loss, all_logits)
                # (no view of all_logits when everything is kept: FSDP2 warns about view outputs)
                logits = all_logits if isinstance(logits_to_keep, int) and logits_to_keep == 0 else all_logits[:, keep]

        if not return_dict:
            out = tuple(x for x in (logits, outputs.past_key_values, outputs.hidden_states) if x is not None)
            return ((loss,) + out) if loss is not None else out
        return FLACausalLMOutput(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                 hidden_states=outputs.hidden_states, attentions=None,
                                 routing_stats=outputs.routing_stats)


class _L2Warp(torch.autograd.Function):
    """Identity on the loss; adds ``factor * max_logit / N`` (times the loss gradient) to the gradient of each
    token's largest logit (N: all tokens), as ``FusedLinearCrossEntropyLoss(use_l2warp=True)`` does."""

    @staticmethod
    def forward(ctx, loss, logits, factor):
        max_logit, max_index = logits.detach().max(dim=-1, keepdim=True)
        ctx.save_for_backward(max_logit, max_index)
        ctx.shape, ctx.dtype, ctx.factor = logits.shape, logits.dtype, factor
        return loss.clone()

    @staticmethod
    def backward(ctx, dloss):
        max_logit, max_index = ctx.saved_tensors
        n = max_logit.numel()
        dlogits = torch.zeros(ctx.shape, dtype=ctx.dtype, device=max_logit.device)
        dlogits.scatter_(-1, max_index, (max_logit.float() * (ctx.factor / n) * dloss).to(ctx.dtype))
        return dloss, dlogits, None


def l2_warp(loss: torch.Tensor, logits: torch.Tensor, l2_penalty_factor: float = 1e-4) -> torch.Tensor:
    """FLA's L2-warp regulariser for unfused heads: returns ``loss`` unchanged, adds the penalty gradient to
    ``logits`` (see ``_L2Warp``)."""
    return _L2Warp.apply(loss, logits, float(l2_penalty_factor))
