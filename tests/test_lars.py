"""or_core's LARS equals lightly's bit for bit on the CPU, solo-learn's (``clip_lr``,
``exclude_bias_n_norm``) to float64 rounding, and never waits for the GPU on CUDA."""

from __future__ import annotations

import copy

import pytest
import torch
from lightly.utils.lars import LARS as LightlyLARS
from torch import nn

from or_core.lars import LARS


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.Linear(16, 4)
    )
    nn.init.zeros_(model[5].weight)  # a decayed weight with norm 0: LARS scaling skipped
    return model


def _groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay = [model[0].weight, model[4].weight, model[5].weight]
    no_decay = [p for p in model.parameters() if all(p is not q for q in decay)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@pytest.mark.parametrize(
    "options",
    [
        dict(momentum=0.9, weight_decay=1e-5, trust_coefficient=0.02),  # the BYOL recipe's LARS
        dict(momentum=0.9, weight_decay=1e-4, nesterov=True),
        dict(momentum=0.9, weight_decay=1e-4, dampening=0.1),
        dict(momentum=0.0, weight_decay=1e-4),
        dict(momentum=0.9, weight_decay=0.0),
    ],
)
def test_steps_equal_lightlys_lars_bit_for_bit(options: dict) -> None:
    """Five steps on the same losses: every parameter and momentum buffer equal after each, with
    a zero weight (norm 0), a weight whose gradient is zero and one without a gradient at first."""
    theirs_model = _model()
    ours_model = copy.deepcopy(theirs_model)
    weight_decay = options.pop("weight_decay")
    theirs = LightlyLARS(_groups(theirs_model, weight_decay), lr=0.5, **options)
    ours = LARS(_groups(ours_model, weight_decay), lr=0.5, **options)
    inputs = torch.randn(6, 5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for step in range(5):
        for model, optimizer in ((theirs_model, theirs), (ours_model, ours)):
            optimizer.zero_grad(set_to_none=True)
            out = model(inputs[step])
            loss = out.pow(2).mean() + out.sum() * 1e-3
            loss.backward()
            model[4].weight.grad.zero_()  # gradient norm 0: LARS scaling skipped
            if step == 0:
                model[0].weight.grad = None  # no gradient yet: no momentum buffer either
            optimizer.step()
        for (name, a), b in zip(theirs_model.named_parameters(), ours_model.parameters()):
            assert torch.equal(a, b), f"step {step}: {name} differs"
            state_a, state_b = theirs.state.get(a, {}), ours.state.get(b, {})
            assert state_a.keys() == state_b.keys()
            if "momentum_buffer" in state_a:
                assert torch.equal(state_a["momentum_buffer"], state_b["momentum_buffer"])


def test_a_closure_is_evaluated_and_its_loss_returned() -> None:
    model = _model()
    optimizer = LARS(_groups(model, 1e-4), lr=0.1, momentum=0.9)

    def closure() -> float:
        optimizer.zero_grad()
        loss = model(torch.ones(2, 3, 8, 8)).sum()
        loss.backward()
        return loss

    before = model[5].weight.clone()
    assert torch.isfinite(optimizer.step(closure))
    assert not torch.equal(before, model[5].weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("solo_learn_options", [False, True])
def test_a_cuda_step_never_synchronizes(solo_learn_options: bool) -> None:
    model = _model().cuda()
    options = dict(clip_lr=True, exclude_bias_n_norm=True) if solo_learn_options else {}
    optimizer = LARS(_groups(model, 1e-5), lr=0.1, momentum=0.9, trust_coefficient=0.02, **options)
    for _ in range(2):  # the second step has momentum buffers
        optimizer.zero_grad()
        model(torch.randn(4, 3, 8, 8, device="cuda")).sum().backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------------------------
# solo-learn's options: clip_lr and exclude_bias_n_norm
# ----------------------------------------------------------------------------------------------
def _solo_learn_steps(params: list[torch.Tensor], grads: list[list[torch.Tensor | None]], lrs: list[float], *,
                      weight_decay: float, eta: float, clip_lr: bool, momentum: float = 0.9,
                      eps: float = 1e-8) -> tuple[list[torch.Tensor], list[dict]]:
    """solo-learn's LARS update (``solo/utils/lars.py``, one parameter group with
    ``exclude_bias_n_norm=True``), written out from its formula, one parameter at a time:

        r = eta * ||p|| / (||g|| + wd ||p|| + eps);  with clip_lr: r = min(r / lr, 1)
        d = r * (g + wd p)   if p is not one-dimensional and ||p|| != 0 and ||g|| != 0, else d = g
        buf = d (first step), buf = mu buf + d (later);  p = p - lr buf

    Returns the parameters after the steps and, per step, which parameters were adapted and
    whether their ratio was clipped (so that a test can check that both cases occur)."""
    params = [p.clone() for p in params]
    buffers: list[torch.Tensor | None] = [None] * len(params)
    cases = []
    for step_grads, lr in zip(grads, lrs):
        adapted, clipped = set(), set()
        for i, (p, g) in enumerate(zip(params, step_grads)):
            if g is None:
                continue
            p_norm, g_norm = p.norm().item(), g.norm().item()
            d = g
            if p.ndim != 1 and p_norm != 0 and g_norm != 0:
                r = eta * p_norm / (g_norm + weight_decay * p_norm + eps)
                if clip_lr and r / lr >= 1:
                    clipped.add(i)
                r = min(r / lr, 1.0) if clip_lr else r
                d = r * (g + weight_decay * p)
                adapted.add(i)
            buffers[i] = d.clone() if buffers[i] is None else momentum * buffers[i] + d
            params[i] = p - lr * buffers[i]
        cases.append({"adapted": adapted, "clipped": clipped})
    return params, cases


def _solo_learn_problem() -> tuple[list[torch.Tensor], list[list[torch.Tensor | None]]]:
    """Parameters of every kind in float64: a conv and a linear weight, a bias and a norm weight
    (one-dimensional: excluded), a zero weight (norm 0), a weight whose gradient is zero, one
    without a gradient at the first step; gradients from 1e-3 to 10 times the weights' scale so
    that clip_lr clips some ratios and not others."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 3, 3, 3), (6, 10), (6,), (4,), (5, 6), (3, 4), (2, 5)]
    params = [torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes]
    params[4].zero_()
    grad_scales = [1e-3, 10.0, 1.0, 1.0, 1.0, 0.0, 0.5]
    grads = []
    for step in range(2):
        step_grads: list[torch.Tensor | None] = [
            torch.randn(*s, generator=gen, dtype=torch.float64) * scale for s, scale in zip(shapes, grad_scales)
        ]
        if step == 0:
            step_grads[6] = None
        grads.append(step_grads)
    return params, grads


@pytest.mark.parametrize("clip_lr", [True, False])
@pytest.mark.parametrize("groups", ["one group", "build_optimizer's groups"])
def test_steps_equal_solo_learns_lars(clip_lr: bool, groups: str) -> None:
    """Two steps (momentum 0.9, the learning rate halved between them as a schedule would) equal
    solo-learn's update with its CIFAR recipe's eta 0.02, with and without clip_lr, on one group
    with exclude_bias_n_norm, and on or_core's two groups (weights decayed, the one-dimensional
    parameters in a group without weight decay), which must give the same update.

    Tolerance: both sides compute the same float64 formula; they differ only in the order of
    the additions inside the norms (``torch._foreach_norm`` against ``Tensor.norm``) and in
    fused against separate multiply-adds, each a relative rounding of at most a few ulp
    (2^-52 = 2.2e-16) per operation over at most 108 elements, i.e. below 1e-13 relative on an
    update and on parameters of order 1; rtol 1e-12 and atol 1e-14 leave a factor 10 to that
    and are 10^6 below a wrong term (e.g. a missing clip changes an update by a factor >= 2)."""
    params, grads = _solo_learn_problem()
    lrs, weight_decay, eta = [0.3, 0.15], 1e-5, 0.02
    expected, cases = _solo_learn_steps(params, grads, lrs, weight_decay=weight_decay, eta=eta, clip_lr=clip_lr)
    # step 1: not 2, 3 (1-D), 4 (norm 0), 5 (zero gradient), 6 (no gradient); step 2: 4 and 6 too
    assert cases[0]["adapted"] == {0, 1} and cases[1]["adapted"] == {0, 1, 4, 6}
    if clip_lr:  # the ratio is clipped for the small gradient, not for the large one
        assert 0 in cases[0]["clipped"] and 1 not in cases[0]["clipped"]

    ours_params = [p.clone() for p in params]
    if groups == "one group":
        param_groups = [{"params": ours_params, "weight_decay": weight_decay}]
        optimizer = LARS(param_groups, lr=lrs[0], momentum=0.9, trust_coefficient=eta, clip_lr=clip_lr,
                         exclude_bias_n_norm=True)
    else:
        decay = [p for p in ours_params if p.ndim != 1]
        no_decay = [p for p in ours_params if p.ndim == 1]
        param_groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = LARS(param_groups, lr=lrs[0], momentum=0.9, trust_coefficient=eta, clip_lr=clip_lr,
                         exclude_bias_n_norm=True)
    for step_grads, lr in zip(grads, lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        for p, g in zip(ours_params, step_grads):
            p.grad = None if g is None else g.clone()
        optimizer.step()
    for i, (ours, theirs) in enumerate(zip(ours_params, expected)):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14, msg=f"parameter {i}")


def test_clip_lr_caps_each_layers_step_at_the_learning_rate() -> None:
    """With clip_lr a weight whose gradient is tiny moves by ``lr * ||g||`` (its ratio clipped
    to 1, no weight decay here); without it, ``eta ||p|| / ||g||`` times more (here 200)."""
    torch.manual_seed(0)
    moved = {}
    for clip_lr in (True, False):
        p = torch.nn.Parameter(torch.ones(10, 10, dtype=torch.float64))
        p.grad = torch.full_like(p, 1e-4)
        LARS([p], lr=0.1, weight_decay=0.0, trust_coefficient=0.02, clip_lr=clip_lr, exclude_bias_n_norm=True).step()
        moved[clip_lr] = (1 - p.detach()).norm().item()
    assert moved[True] == pytest.approx(0.1 * 1e-4 * 10)  # lr * ||g||
    assert moved[False] / moved[True] == pytest.approx(0.02 * 10 / (1e-3 + 1e-8), rel=1e-9)


def test_options_survive_a_state_dict_round_trip() -> None:
    model = _model()
    optimizer = LARS(_groups(model, 1e-5), lr=0.5, momentum=0.9, clip_lr=True, exclude_bias_n_norm=True)
    restored = LARS(_groups(model, 1e-5), lr=0.5, momentum=0.9)
    restored.load_state_dict(optimizer.state_dict())
    assert all(g["clip_lr"] and g["exclude_bias_n_norm"] for g in restored.param_groups)
    assert not LARS(_groups(model, 1e-5), lr=0.5).param_groups[0]["clip_lr"]  # lightly's update by default
