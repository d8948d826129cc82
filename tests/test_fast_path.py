"""The fast path's deferred checks (or_core.fast_path.deferred_checks): the grouping that only
a GPU run takes, checked on the CPU with a device that is only named."""

from __future__ import annotations

import torch

from or_core.fast_path.deferred_checks import CUDA_CHECK_EVERY, DeferredLossCheck, first_non_finite


def test_first_non_finite_names_the_first_bad_tensor() -> None:
    values = [torch.ones(3), torch.tensor([1.0, float("inf")]), torch.tensor(float("nan"))]
    assert first_non_finite(values) == 1
    assert first_non_finite(values[:1]) is None


def test_losses_are_checked_every_step_on_the_cpu_and_in_groups_on_a_gpu() -> None:
    for device, every in ((torch.device("cpu"), 1), (torch.device("cuda"), CUDA_CHECK_EVERY)):
        seen: list[tuple[int, int]] = []
        check = DeferredLossCheck(device, 7, lambda losses, first: seen.append((first, len(losses))))
        for step in range(2 * every + 3):
            check.add(torch.tensor(float(step)))
        check.flush()
        check.flush()  # nothing left: no call
        firsts = list(range(7, 7 + 2 * every + 3, every))
        assert seen == [(first, min(every, 7 + 2 * every + 3 - first)) for first in firsts]
