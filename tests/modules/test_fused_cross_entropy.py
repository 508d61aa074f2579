"""FusedCrossEntropyLoss / cross_entropy_loss: both backends against a float64 torch.nn.functional reference."""

import pytest
import torch
import torch.nn.functional as F

from fla.modules.fused_cross_entropy import FusedCrossEntropyLoss, cross_entropy_loss
from fla.utils.testing import assert_close

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
IGNORE = -100


def reference(logits, target, reduction="mean", label_smoothing=0.0, logit_scale=1.0, lse_square_scale=0.0,
              ignore_index=IGNORE):
    """float64: F.cross_entropy on the scaled logits, plus the z-loss; the mean of an all-ignored batch is 0."""
    z = logits.double() * logit_scale
    rows = F.cross_entropy(z, target, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    valid = target != ignore_index
    rows = rows + lse_square_scale * torch.logsumexp(z, dim=-1).square() * valid
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().clamp(min=1)


def make_inputs(N, V, dtype, device, ignore_every=0):
    logits = (3 * torch.randn(N, V, device=device)).to(dtype)
    target = torch.randint(0, V, (N,), device=device)
    if ignore_every:
        target[::ignore_every] = IGNORE
    return logits, target


def run_and_compare(logits, target, dtype, inplace_backward=False, **options):
    x1 = logits.detach().clone().requires_grad_(True)
    loss = cross_entropy_loss(x1, target, inplace_backward=inplace_backward, **options)
    dloss = torch.randn_like(loss)  # also checks the scaling by the incoming gradient
    loss.backward(dloss)
    x2 = logits.detach().double().requires_grad_(True)
    ref = reference(x2, target, **options)
    ref.backward(dloss.double())
    assert loss.dtype == torch.float32 and x1.grad.dtype == dtype
    assert_close("loss", loss, ref, TOL[dtype])
    assert_close("dlogits", x1.grad, x2.grad, TOL[dtype])


# (N, V on the torch path, V on the interpreted Triton path, dtype, reduction, ignore_every, smoothing, scale, z-loss)
CASES = [
    (1, 33, 33, torch.float32, "mean", 0, 0.0, 1.0, 0.0),
    (7, 1001, 1001, torch.float32, "mean", 3, 0.1, 1.0, 0.0),
    (37, 1001, 257, torch.float32, "sum", 4, 0.0, 0.5, 1e-3),
    (37, 33, 33, torch.float32, "none", 2, 0.2, 2.0, 1e-2),
    (7, 1001, 300, torch.bfloat16, "mean", 3, 0.1, 1.0, 1e-4),
    (13, 129, 129, torch.float16, "none", 5, 0.0, 1.0, 0.0),
]


@pytest.mark.parametrize("N,V,V_triton,dtype,reduction,ignore_every,smoothing,scale,z_loss", CASES,
                         ids=[f"N{c[0]}-V{c[1]}-{str(c[3])[6:]}-{c[4]}-ls{c[6]}-s{c[7]}-z{c[8]}" for c in CASES])
def test_cross_entropy_matches_reference(backend, device, N, V, V_triton, dtype, reduction, ignore_every,
                                         smoothing, scale, z_loss):
    N = N if backend == "torch" else min(N, 20)
    V = V if backend == "torch" else V_triton
    logits, target = make_inputs(N, V, dtype, device, ignore_every)
    run_and_compare(logits, target, dtype, reduction=reduction, label_smoothing=smoothing, logit_scale=scale,
                    lse_square_scale=z_loss)


@pytest.mark.parametrize("dtype,reduction", [(torch.float32, "mean"), (torch.bfloat16, "none"),
                                             (torch.float32, "sum")])
def test_inplace_backward(backend, device, dtype, reduction):
    logits, target = make_inputs(11, 200, dtype, device, ignore_every=4)
    run_and_compare(logits, target, dtype, inplace_backward=True, reduction=reduction, label_smoothing=0.05,
                    lse_square_scale=1e-3)


def test_module_with_batch_dims_and_strided_rows(backend, device):
    B, T, V = 2, 5, 70
    wide = 3 * torch.randn(B, T, V + 9, device=device)
    logits = wide[..., :V]  # rows are strided (stride V + 9), columns contiguous
    target = torch.randint(0, V, (B, T), device=device)
    target[0, :2] = 7
    crit = FusedCrossEntropyLoss(ignore_index=7, reduction="none", label_smoothing=0.1)
    x1 = logits.detach().requires_grad_(True)
    loss = crit(x1, target)
    assert loss.shape == (B, T)
    loss.sum().backward()
    x2 = logits.detach().double().requires_grad_(True)
    ref = reference(x2.reshape(-1, V), target.reshape(-1), "none", 0.1, ignore_index=7)
    ref.sum().backward()
    assert_close("loss", loss.reshape(-1), ref, 1e-5)
    assert_close("dlogits", x1.grad, x2.grad, 1e-5)
    # flattened targets are accepted too
    assert_close("flat", crit(logits, target.reshape(-1)), ref, 1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_all_ignored_gives_zero_loss_and_grads(backend, device, reduction, inplace_backward):
    logits = torch.randn(6, 40, device=device, requires_grad=True)
    target = torch.full((6,), IGNORE, device=device)
    loss = cross_entropy_loss(logits, target, reduction=reduction, label_smoothing=0.1, lse_square_scale=1e-2,
                              inplace_backward=inplace_backward)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(logits.grad, torch.zeros_like(logits.grad))


def test_no_grad_and_empty_batch(backend, device):
    logits, target = make_inputs(5, 50, torch.float32, device, ignore_every=2)
    with torch.no_grad():
        loss = cross_entropy_loss(logits, target, reduction="sum")
    assert_close("loss", loss, reference(logits, target, "sum"), 1e-5)
    empty = torch.randn(0, 50, device=device, requires_grad=True)
    loss = cross_entropy_loss(empty, torch.zeros(0, dtype=torch.long, device=device))
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 50)


@pytest.mark.parametrize("offset", [-1000.0, 1000.0])
def test_extreme_and_masked_logits(backend, device, offset):
    """Large offsets (exp under- / overflow without the running max) and -inf logits (a masked vocabulary)."""
    logits, target = make_inputs(9, 150, torch.float32, device, ignore_every=4)
    logits = logits + offset
    logits[:, 100:] = float("-inf")
    target = target % 100
    target[::4] = IGNORE
    # float32 logits near +-1000 are only exact to 6e-5 (their ulp), which bounds the accuracy of logits - lse
    x1 = logits.clone().requires_grad_(True)
    loss = cross_entropy_loss(x1, target, lse_square_scale=1e-6)
    loss.backward()
    x2 = logits.double().requires_grad_(True)
    ref = reference(x2, target, lse_square_scale=1e-6)
    ref.backward()
    assert_close("loss", loss, ref, 1e-5)
    assert_close("dlogits", x1.grad, x2.grad, 1e-4)


def test_int32_targets(backend, device):
    logits, target = make_inputs(9, 64, torch.float32, device)
    assert_close("loss", cross_entropy_loss(logits, target.int()), reference(logits, target), 1e-5)


def test_bad_inputs_raise_clear_errors(device):
    logits = torch.randn(4, 10, device=device)
    target = torch.zeros(4, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="target must have shape"):
        cross_entropy_loss(logits, target[:3])
    with pytest.raises(ValueError, match="target has dtype float32"):
        cross_entropy_loss(logits, target.float())
    with pytest.raises(ValueError, match="logits has dtype int64"):
        cross_entropy_loss(target.reshape(2, 2), target[:2])
    with pytest.raises(ValueError, match="target is on meta"):
        cross_entropy_loss(logits, target.to("meta"))
    with pytest.raises(ValueError, match="reduction='avg'"):
        FusedCrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be a number in"):
        FusedCrossEntropyLoss(label_smoothing=1.0)
    with pytest.raises(ValueError, match="label_smoothing must be a number in"):
        cross_entropy_loss(logits, target, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="lse_square_scale must be a number >= 0"):
        FusedCrossEntropyLoss(lse_square_scale=-1.0)
    with pytest.raises(ValueError, match="logit_scale must be a finite number"):
        FusedCrossEntropyLoss(logit_scale=float("inf"))
    with pytest.raises(ValueError, match="ignore_index must be an int"):
        FusedCrossEntropyLoss(ignore_index=1.5)


@pytest.mark.gpu
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_large_vocab_on_gpu_matches_plain(inplace_backward):
    N, V = 8192, 32000
    logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16) * 4
    target = torch.randint(0, V, (N,), device="cuda")
    target[::7] = IGNORE
    x1 = logits.clone().requires_grad_(True)
    loss = cross_entropy_loss(x1, target, label_smoothing=0.1, lse_square_scale=1e-4,
                              inplace_backward=inplace_backward)
    loss.backward()
    x2 = logits.float().requires_grad_(True)
    ref = F.cross_entropy(x2, target, ignore_index=IGNORE, label_smoothing=0.1)
    valid = target != IGNORE
    ref = ref + 1e-4 * (torch.logsumexp(x2, -1).square() * valid).sum() / valid.sum()
    ref.backward()
    assert_close("loss", loss, ref, 1e-4)
    assert_close("dlogits", x1.grad, x2.grad, 1e-2)
