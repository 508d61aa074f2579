"""The L1 sparsity regulariser of LTE layers and the controller of its strength lambda.

The routers of the LTE layers score every token; a token is kept iff its score is > 0. Training adds

    L_l1 = mean over (batch, time, LTE layer, head) of lambda[layer, head] * ReLU(score)

to the language-model loss, and a controller steers lambda so that each head keeps about ``buffer_size`` tokens
per training sequence (window tokens included):

* every optimizer step, ``num_kept`` [N_l, H_kv] follows an exponential moving average of the tokens kept per
  sequence, kept = keep ratio * (L - margin), with weight alpha = 2 / (1 + floor(U / 2)), U =
  ``l1_lambda_update_steps``;
* every U steps (after ``l1_lambda_initial_steps``), ``num_kept`` is averaged over the data-parallel ranks, reduced
  to lambda's sharing (``l1_lambda_shared``: 'all' = one lambda, 'layer' = one per layer, 'head' = one per
  (layer, head)), and lambda is updated multiplicatively: x1.5 (``l1_alpha``) over budget, x1/2
  (1 / ``l1_alpha_neg``) under it, unchanged inside the tolerance band, capped at ``l1_lambda_max``, zeroed below
  ``l1_lambda_min``. The first update sets lambda = ``l1_lambda_init`` where over budget, else 0.
* warm-up: up to ``l1_warmup_steps`` the routers are disabled (every token selected) and get no gradient from the
  keys / values, and ``num_kept`` is held at the sequence length; up to ``routing_freeze_steps`` the router
  parameters are frozen; up to ``l1_lambda_initial_steps`` lambda is 0.

The state (``l1_lambda`` and ``num_kept``) lives in two persistent float32 buffers of the model (``lte_buffers``),
so that it is saved and restored with every checkpoint; the controller keeps only the current step's records.

Training-loop wiring (one controller per run)::

    controller = LTESparsityController(model, config.attn, seq_len)
    controller.initialize(step)                       # after loading a checkpoint (step 0 at a fresh start)
    for step in ...:
        controller.prepare_step(step)
        for micro_batch in ...:
            out = model(...)                          # the LTE layers hand back a list of RoutingStats
            loss = (out.loss + controller.loss(stats)) / grad_accum
            loss.backward()
        controller.update(step)
        if log_step: log(controller.metrics(step))
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from fla.layers.lte_router import LTERouter, RoutingStats
from fla.utils import check_choice, check_positive_int

L1_LAMBDA_SHARED = ("all", "layer", "head")
CONTROLLER_KEYS = (
    "buffer_size", "l1_warmup_steps", "routing_freeze_steps", "l1_lambda_initial_steps", "l1_lambda_update_steps",
    "l1_lambda_tolerate", "l1_alpha", "l1_alpha_neg", "l1_lambda_init", "l1_lambda_min", "l1_lambda_max",
    "l1_lambda_shared",
)


def lte_buffers(num_lte_layers: int, num_kv_heads: int, l1_lambda_shared: str,
                device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The controller's state, zero-initialised float32 tensors that the model registers as persistent buffers
    ``l1_lambda`` and ``num_kept`` of its base model.

    Returns:
        (l1_lambda: [] for 'all', [N_l] for 'layer', [N_l, H_kv] for 'head'; num_kept: [N_l, H_kv])
    """
    check_positive_int("num_lte_layers", num_lte_layers)
    check_positive_int("num_kv_heads", num_kv_heads)
    check_choice("l1_lambda_shared", l1_lambda_shared, L1_LAMBDA_SHARED)
    shape = {"all": (), "layer": (num_lte_layers,), "head": (num_lte_layers, num_kv_heads)}[l1_lambda_shared]
    return (torch.zeros(shape, dtype=torch.float32, device=device),
            torch.zeros(num_lte_layers, num_kv_heads, dtype=torch.float32, device=device))


def all_reduce_mean(tensor: torch.Tensor, process_group=None) -> torch.Tensor:
    """The mean of ``tensor`` over the ranks of ``process_group`` (a new tensor); ``tensor`` itself when
    torch.distributed is not initialised or the group has one rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    world_size = dist.get_world_size(process_group)
    if world_size == 1:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=process_group)
    return out.div_(world_size)


def _non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"attn[{name!r}] must be an integer >= 0, got {value!r}")
    return value


def _positive_float(name: str, value, *, allow_zero: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"attn[{name!r}] must be a number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)


def _find_buffer(model: nn.Module, name: str) -> torch.Tensor:
    found = [(n, b) for n, b in model.named_buffers() if n == name or n.endswith("." + name)]
    if len(found) != 1:
        raise ValueError(f"the model must hold exactly one buffer named {name!r} (see lte_buffers); found "
                         f"{[n for n, _ in found] or 'none'}")
    return found[0][1]


class LTESparsityController:
    """Drives the L1 regulariser of a model's LTE routers; see the module docstring.

    Args:
        model: an ``nn.Module`` holding (anywhere) the buffers ``l1_lambda`` and ``num_kept`` made by
            ``lte_buffers``, and the ``LTERouter`` of each LTE layer (found in ``model.modules()`` order, which is
            the LTE layer order).
        attn_config: the model config's ``attn`` dict; the keys in ``CONTROLLER_KEYS`` are required.
        seq_len: the training sequence length (``num_kept`` during warm-up).
        process_group: the data-parallel group over which ``num_kept`` is averaged before a lambda update
            (None: the default group; ignored when torch.distributed is not initialised).

    Metric names (``metrics``): per-head values are reported as one float per head under ``<name>/<head>``, e.g.
    ``lte_head/num_kept_3/0``, so that every value is a float any logger accepts. Layer numbers are the LTE layers'
    absolute indices (``layer_idx`` of the module holding the router) where known, else 0..N_l-1.
    """

    def __init__(self, model: nn.Module, attn_config: dict, seq_len: int, process_group=None) -> None:
        if not isinstance(attn_config, dict):
            raise ValueError(f"attn_config must be a dict (the config's 'attn' entry), "
                             f"got {type(attn_config).__name__}")
        for key in CONTROLLER_KEYS:
            if key not in attn_config:
                raise ValueError(f"attn_config is missing {key!r}, which the LTE sparsity controller needs "
                                 f"(required keys: {', '.join(CONTROLLER_KEYS)})")
        cfg = attn_config
        self.buffer_size = check_positive_int("attn['buffer_size']", cfg["buffer_size"])
        self.warmup_steps = _non_negative_int("l1_warmup_steps", cfg["l1_warmup_steps"])
        self.freeze_steps = _non_negative_int("routing_freeze_steps", cfg["routing_freeze_steps"])
        self.initial_steps = _non_negative_int("l1_lambda_initial_steps", cfg["l1_lambda_initial_steps"])
        self.update_steps = check_positive_int("attn['l1_lambda_update_steps']", cfg["l1_lambda_update_steps"])
        tolerate = cfg["l1_lambda_tolerate"]
        if (isinstance(tolerate, (str, bytes)) or not isinstance(tolerate, Sequence) or len(tolerate) != 2
                or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in tolerate)
                or tolerate[0] > tolerate[1]):
            raise ValueError(f"attn['l1_lambda_tolerate'] must be two numbers (lo, hi) with lo <= hi, the band "
                             f"(lo * buffer_size, hi * buffer_size) of kept tokens where lambda stays; "
                             f"got {tolerate!r}")
        self.tolerate = (float(tolerate[0]), float(tolerate[1]))
        self.alpha_up = _positive_float("l1_alpha", cfg["l1_alpha"])
        self.alpha_neg = _positive_float("l1_alpha_neg", cfg["l1_alpha_neg"])
        self.lambda_init = _positive_float("l1_lambda_init", cfg["l1_lambda_init"], allow_zero=True)
        self.lambda_min = _positive_float("l1_lambda_min", cfg["l1_lambda_min"], allow_zero=True)
        self.lambda_max = _positive_float("l1_lambda_max", cfg["l1_lambda_max"], allow_zero=True)
        check_choice("attn['l1_lambda_shared']", cfg["l1_lambda_shared"], L1_LAMBDA_SHARED)
        self.shared = cfg["l1_lambda_shared"]
        self.seq_len = check_positive_int("seq_len", seq_len)
        self.process_group = process_group
        # EMA weight of a moving average over about U / 2 steps.
        self.ema_alpha = 2.0 / (1 + self.update_steps // 2)

        self.l1_lambda = _find_buffer(model, "l1_lambda")
        self.num_kept = _find_buffer(model, "num_kept")
        if self.num_kept.ndim != 2:
            raise ValueError(f"num_kept must be [num_lte_layers, num_kv_heads], got {list(self.num_kept.shape)}")
        self.num_layers, self.num_kv_heads = self.num_kept.shape
        expected = {"all": [], "layer": [self.num_layers], "head": [self.num_layers, self.num_kv_heads]}[self.shared]
        if list(self.l1_lambda.shape) != expected:
            raise ValueError(f"l1_lambda has shape {list(self.l1_lambda.shape)} but l1_lambda_shared={self.shared!r} "
                             f"with num_kept {list(self.num_kept.shape)} needs {expected}")

        self.routers: List[LTERouter] = [m for m in model.modules() if isinstance(m, LTERouter)]
        if len(self.routers) != self.num_layers:
            raise ValueError(f"num_kept has {self.num_layers} rows (LTE layers) but the model holds "
                             f"{len(self.routers)} LTERouter modules")
        # metric names use the absolute index of the layer owning each router (its ``layer_idx``) where there is one
        owner_idx = {id(m.router): m.layer_idx for m in model.modules()
                     if isinstance(getattr(m, "router", None), LTERouter)
                     and isinstance(getattr(m, "layer_idx", None), int)}
        self.layer_ids = [owner_idx.get(id(r), i) for i, r in enumerate(self.routers)]
        self._routing_grad = [r.routing_grad for r in self.routers]
        params, seen = [], set()
        for r in self.routers:  # 'all' sharing: one stack in every router, each parameter once
            for p in r.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append((p, p.requires_grad))
        self._router_params = params
        self._reset_records()

    # ------------------------------------------------------------------ schedule

    def _reset_records(self) -> None:
        self._keep: List[List[torch.Tensor]] = [[] for _ in range(self.num_layers)]
        self._l1_loss: List[torch.Tensor] = []
        self._l1_score: List[torch.Tensor] = []
        self._length: Optional[int] = None
        self._margin: Optional[int] = None

    def _apply_schedule(self, step: int) -> None:
        warm = step <= self.warmup_steps
        for router, routing_grad in zip(self.routers, self._routing_grad):
            router.enabled = not warm
            router.routing_grad = False if warm else routing_grad
        if warm:
            self.num_kept.fill_(float(self.seq_len))
        frozen = step <= self.freeze_steps
        for p, requires_grad in self._router_params:
            p.requires_grad_(False if frozen else requires_grad)
        if step <= self.initial_steps:
            self.l1_lambda.zero_()

    @torch.no_grad()
    def initialize(self, step: int) -> None:
        """Call once after loading a checkpoint (step 0 at a fresh start): applies the warm-up, freeze and
        initial-lambda rules for ``step``. Past those phases, ``l1_lambda`` and ``num_kept`` keep their loaded
        values."""
        self._reset_records()
        self._apply_schedule(step)

    @torch.no_grad()
    def prepare_step(self, step: int) -> None:
        """Call at the start of every optimizer step: forgets the last step's records and applies the schedule
        (routers re-enabled at ``l1_warmup_steps + 1``, unfrozen at ``routing_freeze_steps + 1``)."""
        self._reset_records()
        self._apply_schedule(step)

    def is_lambda_step(self, step: int) -> bool:
        """Whether ``update(step)`` updates lambda (and ``metrics(step)`` reports it)."""
        return step > self.initial_steps and step % self.update_steps == 0

    # ------------------------------------------------------------------ per micro-batch

    def _layer_lambda(self, index: int) -> torch.Tensor:
        if self.shared == "all":
            return self.l1_lambda
        return self.l1_lambda[index]  # 'layer': a scalar; 'head': [H_kv], broadcast over the last dimension

    def loss(self, stats: Sequence[RoutingStats]) -> torch.Tensor:
        """The L1 term of one micro-batch: mean over (batch, time, layer, head) of lambda * ReLU(score), without the
        last ``margin`` positions of each sequence (scored without their right context). Records the keep ratios
        (score > 0; padded positions count as not kept) for ``update``.

        Args:
            stats: one ``RoutingStats`` per LTE layer, in any order (sorted by ``layer_idx``).

        Returns:
            a float32 scalar to add to the language-model loss before dividing by the gradient accumulation steps.
        """
        if len(stats) != self.num_layers:
            raise ValueError(f"loss expects RoutingStats of all {self.num_layers} LTE layers, got {len(stats)}")
        terms = []
        for index, st in enumerate(sorted(stats, key=lambda s: s.layer_idx)):
            score = st.score
            if score.ndim != 3 or score.shape[-1] != self.num_kv_heads:
                raise ValueError(f"RoutingStats.score of layer {st.layer_idx} must be [batch, time, "
                                 f"num_kv_heads={self.num_kv_heads}], got {list(score.shape)}")
            length = score.shape[1] - st.margin
            if length <= 0:
                raise ValueError(f"sequences of {score.shape[1]} tokens are too short for the L1 regulariser, which "
                                 f"drops the last margin={st.margin} positions of layer {st.layer_idx}")
            score = score[:, :length].float()
            relu = torch.relu(score)
            lam = self._layer_lambda(index).to(device=score.device)
            terms.append((relu * lam).mean())
            with torch.no_grad():
                self._keep[index].append((score > 0).float().mean(dim=(0, 1)))
                self._l1_score.append(relu.mean())
            self._length, self._margin = length, st.margin
        l1 = torch.stack(terms).mean()
        self._l1_loss.append(l1.detach())
        return l1

    # ------------------------------------------------------------------ per optimizer step

    def keep_ratio(self) -> Optional[torch.Tensor]:
        """[N_l, H_kv] keep ratios of this step, averaged over its micro-batches (None before any ``loss``)."""
        if not self._keep[0]:
            return None
        return torch.stack([torch.stack(ratios).mean(0) for ratios in self._keep]).to(self.num_kept.device)

    @torch.no_grad()
    def update(self, step: int, seq_len: Optional[int] = None) -> None:
        """Call after the accumulation loop: moves ``num_kept`` towards this step's kept tokens per sequence and,
        on lambda steps (``is_lambda_step``), averages ``num_kept`` over the ranks and updates ``l1_lambda``.

        Args:
            step: the current optimizer step.
            seq_len: the sequence length L of the micro-batches; kept = keep ratio * (L - margin). None: the length
                of the last micro-batch given to ``loss``.

        As in the reference, the moving average runs on every step, warm-up steps included (``prepare_step``
        resets ``num_kept`` to the sequence length while the warm-up lasts), and it is rank-local between the
        all-reduces of the lambda steps.
        """
        ratio = self.keep_ratio()
        if ratio is not None:
            length = self._length if seq_len is None else check_positive_int("seq_len", seq_len) - self._margin
            kept = ratio * float(length)
            self.num_kept.mul_(1.0 - self.ema_alpha).add_(kept, alpha=self.ema_alpha)
        if not self.is_lambda_step(step):
            return
        self.num_kept.copy_(all_reduce_mean(self.num_kept, self.process_group))
        kept = self.num_kept
        if self.shared == "all":
            kept = kept.mean()
        elif self.shared == "layer":
            kept = kept.mean(-1)
        self.l1_lambda.copy_(self._multiplicative_update(step, self.l1_lambda, kept))

    def _multiplicative_update(self, step: int, lam: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        lo, hi = self.tolerate
        large = kept > self.buffer_size * lo
        small = kept < self.buffer_size * hi
        if step // self.update_steps == self.initial_steps // self.update_steps + 1:  # the first update
            return torch.where(large, torch.full_like(lam, self.lambda_init), torch.zeros_like(lam))
        factor = torch.ones_like(lam)
        factor = torch.where(large & ~small, torch.full_like(lam, self.alpha_up), factor)
        factor = torch.where(small & ~large, torch.full_like(lam, 1.0 / self.alpha_neg), factor)
        lam = torch.clamp(lam * factor, max=self.lambda_max)
        lam = torch.where(lam < self.lambda_min, torch.zeros_like(lam), lam)
        return torch.where((lam == 0) & large, torch.full_like(lam, self.lambda_min), lam)

    # ------------------------------------------------------------------ logging

    @torch.no_grad()
    def metrics(self, step: int) -> Dict[str, float]:
        """This step's statistics as floats (names in the class docstring and the module's spec):

        * always: ``lte/overall_sparsity`` (mean keep ratio), ``lte/l1_loss`` and ``lte/l1_score`` (mean ReLU
          score) averaged over the micro-batches (these three only once ``loss`` ran this step; rank-local),
          ``lte_layer/sparsity_{k}``, ``lte_layer/num_kept_{k}`` (means over heads);
        * on lambda steps also: ``lte/overall_l1_lambda``, ``lte_layer/l1_lambda_{k}`` (not with 'all'),
          ``lte_head/sparsity_{k}/{h}``, ``lte_head/num_kept_{k}/{h}``, ``lte_head/num_kept_max_{k}`` and, with
          'head' sharing, ``lte_head/l1_lambda_{k}/{h}``, ``lte_head/l1_lambda_max_{k}``.
        """
        out: Dict[str, float] = {}
        ratio = self.keep_ratio()
        num_kept = self.num_kept.float().cpu()
        lam = self.l1_lambda.float().cpu()
        if ratio is not None:
            ratio = ratio.float().cpu()
            out["lte/overall_sparsity"] = ratio.mean().item()
            out["lte/l1_loss"] = torch.stack(self._l1_loss).float().mean().item()
            out["lte/l1_score"] = torch.stack(self._l1_score).float().mean().item()
        for index, k in enumerate(self.layer_ids):
            if ratio is not None:
                out[f"lte_layer/sparsity_{k}"] = ratio[index].mean().item()
            out[f"lte_layer/num_kept_{k}"] = num_kept[index].mean().item()
        if not self.is_lambda_step(step):
            return out
        out["lte/overall_l1_lambda"] = lam.mean().item()
        for index, k in enumerate(self.layer_ids):
            if self.shared != "all":
                out[f"lte_layer/l1_lambda_{k}"] = lam[index].mean().item()
            for h in range(self.num_kv_heads):
                if ratio is not None:
                    out[f"lte_head/sparsity_{k}/{h}"] = ratio[index, h].item()
                out[f"lte_head/num_kept_{k}/{h}"] = num_kept[index, h].item()
            out[f"lte_head/num_kept_max_{k}"] = num_kept[index].max().item()
            if self.shared == "head":
                for h in range(self.num_kv_heads):
                    out[f"lte_head/l1_lambda_{k}/{h}"] = lam[index, h].item()
                out[f"lte_head/l1_lambda_max_{k}"] = lam[index].max().item()
        return out
