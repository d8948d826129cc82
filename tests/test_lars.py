"""or_core's LARS equals lightly's bit for bit on the CPU, and never waits for the GPU on CUDA."""

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
def test_a_cuda_step_never_synchronizes() -> None:
    model = _model().cuda()
    optimizer = LARS(_groups(model, 1e-5), lr=0.1, momentum=0.9, trust_coefficient=0.02)
    for _ in range(2):  # the second step has momentum buffers
        optimizer.zero_grad()
        model(torch.randn(4, 3, 8, 8, device="cuda")).sum().backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
