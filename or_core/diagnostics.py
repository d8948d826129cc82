"""Diagnostics of dimensional collapse: spectra of weights and features, and rank scalars.

He, Du & Ma, "Preventing Dimensional Collapse in Self-Supervised Learning via Orthogonality
Regularization" (NeurIPS 2024), Figures 2 and 3, show collapse as the decay of sorted spectra,
each normalized by its largest value and plotted on a log scale:

* weights: the singular values of each conv / linear weight's matrix view
  (:func:`weight_spectra`; the eigenvalues of the smaller-side Gram ``W W^T`` or ``W^T W`` are
  their squares);
* features: the eigenvalues of the centered covariance of the (pooled) outputs of chosen layers
  and of the representation, over a set of test images (:func:`feature_spectra`).

Scalars that summarize a spectrum: :func:`effective_rank` (Roy & Vetterli, 2007), :func:`rankme`
(Garrido et al., 2023) and lightly's :func:`std_of_l2_normalized` (Chen & He, 2021), called
through here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from or_core.fast_path.compiled_calls import eager
from or_core.orthogonality import _compute_dtype, matrix_view, regularized_weights, so_penalty

__all__ = [
    "REPRESENTATION",
    "weight_spectra",
    "orthogonality_error",
    "features",
    "feature_spectra",
    "covariance_eigenvalues",
    "normalized_spectrum",
    "effective_rank",
    "rankme",
    "std_of_l2_normalized",
]

#: Key under which :func:`features` and :func:`feature_spectra` return the model's own output.
REPRESENTATION = "representation"

Patterns = str | Iterable[str] | None


def std_of_l2_normalized(z: Tensor) -> Tensor:
    """Mean over dimensions of the standard deviation of the l2-normalized rows of ``z``
    ``(N, D)``: ``mean_j std_i (z_i / ||z_i||)_j``; 0 for collapse to one vector, about
    ``1 / sqrt(D)`` for isotropic features (Chen & He, 2021). Lightly's own function.

    Imported when called: :mod:`lightly.utils.debug` loads matplotlib, which reading records
    and making tables must not (the package's first import reaches this module)."""
    from lightly.utils.debug import std_of_l2_normalized as lightly_std_of_l2_normalized

    return lightly_std_of_l2_normalized(z)


Data = Tensor | Iterable[Tensor | Sequence[Tensor]]


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def weight_spectra(
    module: nn.Module, include: Patterns = None, exclude: Patterns = None
) -> dict[str, Tensor]:
    """Singular values of the matrix view of every weight that OR regularizes.

    For a weight of shape ``(out, in, *kernel)`` with matrix view ``W`` of shape
    ``(out, in * prod(kernel))`` (:func:`~or_core.orthogonality.matrix_view`), returns
    ``s_1 >= ... >= s_r >= 0``, ``r = min(out, in * prod(kernel))``. The eigenvalues of the
    smaller-side Gram (``W W^T`` or ``W^T W``) are ``s_i^2``; all ``s_i = 1`` exactly when that
    Gram is the identity, the minimum of the SO penalty.

    Args:
        module: the encoder.
        include, exclude: regular expressions on weight names, as in
            :func:`~or_core.orthogonality.regularized_weights`, which selects the weights.

    Returns:
        ``{weight name: singular values}``, descending, on the CPU, in float32 (float64 for a
        float64 weight).
    """
    spectra = {}
    for name, weight in regularized_weights(module, include, exclude):
        w = matrix_view(weight.detach()).to(_compute_dtype(weight))
        # Same singular values; LAPACK on the CPU is several times faster on the tall side.
        tall = w.t() if w.shape[0] < w.shape[1] else w
        spectra[name] = torch.linalg.svdvals(tall).cpu()
    return spectra


@torch.no_grad()
def orthogonality_error(
    module: nn.Module, include: Patterns = None, exclude: Patterns = None
) -> dict[str, float]:
    """Per-layer soft-orthogonality error ``||G||_F^2`` of the weights OR regularizes.

    ``G = W W^T - I`` if ``out <= in * prod(kernel)``, else ``W^T W - I``
    (:func:`~or_core.orthogonality.so_penalty`), in float32 (float64 for a float64 weight).
    With the singular values ``s_i`` of ``W`` this is ``sum_i (s_i^2 - 1)^2``.

    Args:
        module: the encoder.
        include, exclude: regular expressions on weight names, see :func:`weight_spectra`.

    Returns:
        ``{weight name: ||G||_F^2}``.
    """
    return {
        name: so_penalty(weight.detach()).item()
        for name, weight in regularized_weights(module, include, exclude)
    }


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------
def _pool(output: Tensor) -> Tensor:
    """Reduce a layer output to one row per sample, ``(N, C)``.

    * ``(N, C)``: kept;
    * ``(N, T, C)``: read as the tokens of a transformer (ViT) block and averaged over the
      tokens ``T`` (the class token included);
    * ``(N, C, *spatial)`` with two or more spatial dims: global average pooling over all
      spatial dims (a CNN stage);
    * ``(N,)``: one feature per sample, ``(N, 1)``.

    A 3-D output is always taken as tokens, so a ``Conv1d`` output ``(N, C, L)`` would be
    averaged over ``C``; hook a module with a 2-D or 4-D output there instead.
    """
    if output.dim() <= 2:
        return output.reshape(output.shape[0], -1)
    if output.dim() == 3:
        return output.mean(dim=1)
    return output.flatten(2).mean(dim=2)


def _check_layers(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    """The modules named by ``layers``; a ValueError names the unknown ones and valid examples."""
    modules = dict(model.named_modules())
    unknown = [name for name in layers if name not in modules]
    if unknown:
        valid = [name for name in modules if name]
        shown = ", ".join(repr(n) for n in valid[:8]) + (", ..." if len(valid) > 8 else "")
        raise ValueError(
            f"unknown layer name(s) {', '.join(repr(n) for n in unknown)} in "
            f"{type(model).__name__}; valid names ({len(valid)} in all, from "
            f"model.named_modules()) include {shown}"
        )
    if REPRESENTATION in layers:
        raise ValueError(f"{REPRESENTATION!r} is reserved for the model's own output")
    return {name: modules[name] for name in layers}


def _inputs(data: Data) -> Iterator[Tensor]:
    """The input batches: a tensor is one batch; an iterable yields tensors or (x, label, ...)."""
    if isinstance(data, Tensor):
        yield data
        return
    for batch in data:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not isinstance(batch, Tensor):
            raise TypeError(
                f"data must yield tensors or (tensor, label) tuples, got {type(batch).__name__}"
            )
        yield batch


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def features(
    model: nn.Module,
    data: Data,
    layers: Sequence[str],
    *,
    max_samples: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Pooled outputs of ``layers`` and the model's output, one row per input sample.

    Each module named in ``layers`` gets a forward hook (``register_forward_hook``) that pools
    its output to ``(N, C)``: global average pooling over all spatial dims for ``(N, C, H, W)``
    (or any ``(N, C, *spatial)`` with at least 2 spatial dims), the mean over tokens for a 3-D
    ``(N, T, C)`` output of a ViT block, unchanged for ``(N, C)``. The model's own output is
    flattened to ``(N, D)`` and returned under the key ``"representation"``.

    The pass runs under ``torch.no_grad`` with the model in eval mode (batch-norm uses its
    running statistics, so the rows do not depend on how the data is batched). The train/eval
    mode of every submodule is restored and the hooks are removed afterwards, also on error.

    Args:
        model: the encoder, e.g. a torchvision ResNet with ``fc = nn.Identity()``.
        data: a tensor batch ``(N, C, H, W)`` (one forward pass), or an iterable (a DataLoader)
            of tensors or of ``(tensor, label, ...)`` tuples.
        layers: names of submodules as in ``model.named_modules()``, e.g.
            ``["layer1", "layer2", "layer3", "layer4"]`` for a torchvision ResNet.
        max_samples: use at most this many samples (the first ones); ``None`` uses all.
        device: where the input batches are sent (the model is not moved); ``None`` takes the
            device of the model's parameters.

    Returns:
        ``{name: (N, C) tensor on the CPU}`` for each layer, and ``"representation"``.

    Raises:
        ValueError: for an unknown layer name (the message lists some valid ones).
        RuntimeError: if a hooked layer does not run exactly once per forward pass.
    """
    if isinstance(layers, str):
        layers = [layers]
    layers = list(dict.fromkeys(layers))
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
    hooked = _check_layers(model, layers)
    device = _model_device(model) if device is None else torch.device(device)

    batch_outputs: dict[str, list[Tensor]] = {name: [] for name in layers}
    collected: dict[str, list[Tensor]] = {name: [] for name in [*layers, REPRESENTATION]}

    def make_hook(name: str):
        def hook(module: nn.Module, args: object, output: object) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"layer {name!r} returned {type(output).__name__}, not a tensor"
                )
            batch_outputs[name].append(_pool(output.detach()).cpu())

        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = [module.register_forward_hook(make_hook(name)) for name, module in hooked.items()]
    try:
        model.eval()
        seen = 0
        for x in _inputs(data):
            if max_samples is not None:
                x = x[: max_samples - seen]
            if len(x) == 0:
                break
            for outputs in batch_outputs.values():
                outputs.clear()
            with eager():  # a model compiled for training (or_core.fast_path) runs eagerly
                output = model(x.to(device))
            if not isinstance(output, Tensor):
                raise TypeError(f"the model returned {type(output).__name__}, not a tensor")
            for name, outputs in batch_outputs.items():
                if len(outputs) != 1:
                    raise RuntimeError(
                        f"layer {name!r} ran {len(outputs)} times in one forward pass; "
                        f"hook a module that runs exactly once"
                    )
                collected[name].append(outputs[0])
            collected[REPRESENTATION].append(output.detach().reshape(len(x), -1).cpu())
            seen += len(x)
            if max_samples is not None and seen >= max_samples:
                break
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training

    if seen == 0:
        raise ValueError("data yielded no samples")
    return {name: torch.cat(rows) for name, rows in collected.items()}


def covariance_eigenvalues(x: Tensor) -> Tensor:
    """Eigenvalues of the centered covariance of the rows of ``x`` ``(N, D)``, in float64.

    ``C = (X - mean)^T (X - mean) / (N - 1)`` with ``mean`` the mean row; returns its ``D``
    eigenvalues in descending order, clamped at ``>= 0`` (rounding can make the zero ones
    slightly negative). At most ``N - 1`` of them are non-zero.
    """
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"need an (N, D) matrix with N >= 2, got shape {tuple(x.shape)}")
    x = x.detach().to(torch.float64)
    centered = x - x.mean(dim=0, keepdim=True)
    cov = centered.t() @ centered / (x.shape[0] - 1)
    return torch.linalg.eigvalsh(cov).flip(0).clamp_min(0.0)


def feature_spectra(
    model: nn.Module,
    data: Data,
    layers: Sequence[str],
    *,
    max_samples: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Covariance spectra of pooled layer outputs and of the representation.

    The recipe of He, Du & Ma (2024), Figures 2 and 3: run test images through the encoder,
    pool each chosen layer's output to ``(N, C)`` (:func:`features`), and return the
    eigenvalues of ``C = (X - mean)^T (X - mean) / (N - 1)`` in float64, descending, clamped at
    ``>= 0`` (:func:`covariance_eigenvalues`). Use ``N`` well above the widest ``C`` (the paper's
    recipe: 1k to 10k test images), since at most ``N - 1`` eigenvalues can be non-zero.

    Args: as for :func:`features`.

    Returns:
        ``{name: eigenvalues}`` for each layer and for ``"representation"``.
    """
    pooled = features(model, data, layers, max_samples=max_samples, device=device)
    return {name: covariance_eigenvalues(x) for name, x in pooled.items()}


def normalized_spectrum(eigenvalues: Tensor) -> Tensor:
    """``lambda_i / max_j lambda_j``: a spectrum scaled so that its largest value is 1.

    He, Du & Ma (2024) plot these, sorted descending, on a log scale. An all-zero spectrum
    (complete collapse) is returned as zeros rather than NaN.
    """
    largest = eigenvalues.max()
    if largest <= 0:
        return torch.zeros_like(eigenvalues)
    return eigenvalues / largest


# ----------------------------------------------------------------------------------------------
# Scalars
# ----------------------------------------------------------------------------------------------
def _entropy(p: Tensor) -> Tensor:
    """``-sum_i p_i log p_i`` with ``0 log 0 = 0``."""
    return -torch.xlogy(p, p).sum()


@torch.no_grad()
def effective_rank(x: Tensor, eps: float = 1e-12) -> float:
    """Effective rank of the centered data matrix (Roy & Vetterli, EUSIPCO 2007).

    Roy & Vetterli, "The effective rank: a measure of effective dimensionality". With
    ``s_1, ..., s_r`` the singular values of the centered ``(N, D)`` matrix ``X - mean``
    (``mean`` the mean row), in float64::

        p_i = s_i / sum_j s_j,      erank = exp(-sum_i p_i log p_i)     (0 log 0 = 0)

    It lies in ``[1, min(N, D)]`` and equals ``k`` when there are exactly ``k`` equal non-zero
    singular values. The data is centered here so that a constant offset shared by all rows,
    which carries no information about the samples, does not count as a dimension; the result
    is invariant to such an offset (unlike :func:`rankme`).

    Args:
        x: an ``(N, D)`` matrix, one sample per row.
        eps: if the largest centered singular value is at most ``eps * ||x||_F`` the rows are
            equal up to rounding (complete collapse) and ``0.0`` is returned.
    """
    if x.dim() != 2:
        raise ValueError(f"need an (N, D) matrix, got shape {tuple(x.shape)}")
    x = x.to(torch.float64)
    s = torch.linalg.svdvals(x - x.mean(dim=0, keepdim=True))
    if s.numel() == 0 or s[0] <= eps * torch.linalg.matrix_norm(x):
        return 0.0
    return torch.exp(_entropy(s / s.sum())).item()


@torch.no_grad()
def rankme(x: Tensor, eps: float = 1e-7) -> float:
    """RankMe of an embedding matrix (Garrido, Balestriero, Najman & LeCun, ICML 2023).

    "RankMe: Assessing the downstream performance of pretrained self-supervised representations
    by their rank". With ``s_1, ..., s_r`` the singular values of the ``(N, D)`` embedding
    matrix itself, *not* centered, as in the paper, in float64::

        p_k = s_k / ||s||_1 + eps,      RankMe = exp(-sum_k p_k log p_k)

    Because it is not centered, a constant offset shared by all embeddings counts as a
    direction: constant embeddings have RankMe about 1 (see :func:`effective_rank` for the centered
    measure). ``eps`` adds about ``r * eps * log(1/eps)`` to the entropy, so ``k`` equal
    singular values give slightly more than ``k``. A zero matrix gives ``0.0``.
    """
    if x.dim() != 2:
        raise ValueError(f"need an (N, D) matrix, got shape {tuple(x.shape)}")
    s = torch.linalg.svdvals(x.to(torch.float64))
    total = s.sum()
    if total == 0:
        return 0.0
    return torch.exp(_entropy(s / total + eps)).item()
