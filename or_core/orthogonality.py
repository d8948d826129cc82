"""Orthogonality regularizers for the weights of an encoder.

He, Du & Ma, "Preventing Dimensional Collapse in Self-Supervised Learning via Orthogonality
Regularization" (NeurIPS 2024) add to the self-supervised loss

    L = L_ssl + gamma * sum_l OR(W_l)

over every convolutional and linear weight ``W_l`` of the encoder. The penalties ``OR`` are those
of Bansal, Chen & Wang, "Can We Gain More from Orthogonality Regularizations in Training Deep
CNNs?" (NeurIPS 2018).

Every penalty looks at a weight of shape ``(out, in, *kernel)`` as the matrix ``W`` of shape
``(out, in * prod(kernel))`` and at the Gram matrix of its *smaller* side::

    G = W W^T - I   if out <= in * prod(kernel)   (rows can be orthonormal)
    G = W^T W - I   otherwise                     (columns can be orthonormal)

The Gram of the larger side has rank at most the smaller side and can never reach ``I``.

SO splits exactly into the squares of the diagonal and of the off-diagonal of ``G``. With ``M``
the *wide* view (``n <= m``: ``W`` or ``W^T``) and ``m_i`` its rows::

    SO(W) = sum_i G_ii^2             + sum_{i != j} G_ij^2
          = sum_i (||m_i||^2 - 1)^2  + (||M M^T||_F^2 - sum_i ||m_i||^4)
          = SO_diag(W)               + SO_offdiag(W)

``SO_diag`` only asks for unit norms (of the rows of ``M``), ``SO_offdiag`` only for mutually
orthogonal rows, whatever their norms: the two kinds ``"so_diag"`` and ``"so_offdiag"`` are the
controls that tell which half of SO does the work. Neither is in He et al. or Bansal et al.

This file holds two layers:

* the functional penalties (:func:`so_penalty`, :func:`srip_penalty`, :func:`dso_penalty`,
  :func:`mc_penalty`, :func:`so_diag_penalty`, :func:`so_offdiag_penalty`), short, plain
  autograd code that reads like the formulas;
* :class:`OrthogonalityRegularizer`, the module to train with. It finds the weights of an
  encoder, computes SO and its off-diagonal part through a closed-form gradient, SO's diagonal
  part from row norms alone, and SRIP through matrix-vector products with persistent
  power-iteration vectors, the last two never forming a Gram.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PENALTY_KINDS",
    "DEFAULT_GAMMA",
    "matrix_view",
    "smaller_side_gram",
    "so_penalty",
    "srip_penalty",
    "dso_penalty",
    "mc_penalty",
    "so_diag_penalty",
    "so_offdiag_penalty",
    "regularized_weights",
    "OrthogonalityRegularizer",
]

PenaltyKind = Literal["so", "srip", "dso", "mc", "so_diag", "so_offdiag"]
PENALTY_KINDS: tuple[str, ...] = ("so", "srip", "dso", "mc", "so_diag", "so_offdiag")

#: Default ``gamma`` per penalty. SO and SRIP are the middle of the paper's grids
#: (SO {1e-5, 1e-6, 1e-7}, SRIP {1e-3, 1e-4, 1e-5}) and the values reported for ResNets.
#: DSO (= 2 SO + a constant, see :func:`dso_penalty`) takes SO's; MC, bounded by 1 like a
#: normalized spectral quantity, takes SRIP's. SO's two parts (``so_diag + so_offdiag = so``)
#: take SO's value and grid, so that a control runs at the same strength as the SO it splits.
#: All but SO's and SRIP's are this library's choice.
DEFAULT_GAMMA: dict[str, float] = {
    "so": 1e-6,
    "srip": 1e-3,
    "dso": 1e-6,
    "mc": 1e-3,
    "so_diag": 1e-6,
    "so_offdiag": 1e-6,
}

_REGULARIZED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


# ----------------------------------------------------------------------------------------------
# The matrix view
# ----------------------------------------------------------------------------------------------
def matrix_view(weight: Tensor) -> Tensor:
    """Return ``weight`` of shape ``(out, in, *kernel)`` as a matrix ``(out, in * prod(kernel))``.

    Raises:
        ValueError: if ``weight`` has fewer than two dimensions (a bias or a norm scale).
    """
    if weight.dim() < 2:
        raise ValueError(
            f"orthogonality needs a weight with at least 2 dimensions (out, in, *kernel); "
            f"got a {weight.dim()}-D tensor of shape {tuple(weight.shape)} (a bias or norm scale?)"
        )
    return weight.reshape(weight.shape[0], -1)


def _compute_dtype(weight: Tensor) -> torch.dtype:
    """float64 stays float64 (for exact checks); everything else is computed in float32."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _short_side_matrix(weight: Tensor) -> Tensor:
    """The matrix view, transposed if needed so that it is wide: ``(n, m)`` with ``n <= m``.

    Its rows are the vectors that can be orthonormal; ``M M^T`` is the smaller-side Gram.
    """
    w = matrix_view(weight).to(_compute_dtype(weight))
    return w if w.shape[0] <= w.shape[1] else w.t()


def smaller_side_gram(weight: Tensor) -> Tensor:
    """``G = W W^T - I`` if ``out <= in*prod(kernel)``, else ``W^T W - I``, in float32 (or float64).

    The result is ``min(out, in*prod(kernel))`` square and is zero exactly when the rows (or the
    columns) of the matrix view are orthonormal.
    """
    with torch.autocast(weight.device.type, enabled=False):
        m = _short_side_matrix(weight)
        eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
        return m @ m.t() - eye


# ----------------------------------------------------------------------------------------------
# Functional penalties: plain autograd, one weight at a time
# ----------------------------------------------------------------------------------------------
def so_penalty(weight: Tensor) -> Tensor:
    """Soft orthogonality (SO) of Bansal, Chen & Wang (2018), eq. (2), as used by He et al. (2024).

    ``SO(W) = ||G||_F^2`` with ``G`` the smaller-side Gram minus the identity
    (:func:`smaller_side_gram`). Its gradient is ``4 G W`` when ``G = W W^T - I`` and ``4 W G``
    when ``G = W^T W - I``.
    """
    return smaller_side_gram(weight).pow(2).sum()


def dso_penalty(weight: Tensor) -> Tensor:
    """Double soft orthogonality (DSO) of Bansal, Chen & Wang (2018), eq. (3).

    ``DSO(W) = ||W^T W - I||_F^2 + ||W W^T - I||_F^2``: both Grams, whichever side is smaller.
    For a ``(n, m)`` matrix view with ``n <= m``, ``||W^T W||_F = ||W W^T||_F`` gives the identity
    ``DSO(W) = 2 SO(W) + (m - n)``, used here to avoid the large Gram. Hence DSO is zero only for
    square orthogonal matrices; for a non-square one with orthonormal rows it equals ``m - n``.
    """
    with torch.autocast(weight.device.type, enabled=False):
        m = _short_side_matrix(weight)
    n_small, n_large = m.shape
    return 2.0 * so_penalty(weight) + float(n_large - n_small)


def so_diag_penalty(weight: Tensor) -> Tensor:
    """The diagonal part of SO: ``sum_i G_ii^2 = sum_i (||m_i||^2 - 1)^2`` (a control, not in
    He et al. or Bansal et al.).

    ``m_i`` are the rows of the wide view ``M`` (the rows of the matrix view ``W`` if
    ``out <= in*prod(kernel)``, else its columns), whose Gram ``M M^T - I`` is :func:`so_penalty`'s
    ``G``: ``G_ii = ||m_i||^2 - 1``. The penalty is zero exactly when every ``m_i`` has unit norm,
    whatever the angles between them: it controls the weights' norms only. Its gradient is
    ``4 diag(G) M`` (row ``i``: ``4 (||m_i||^2 - 1) m_i``), i.e. ``4 diag(G) W`` when
    ``G = W W^T - I`` and ``4 W diag(G)`` when ``G = W^T W - I``. No Gram is needed.
    ``so_diag_penalty(W) + so_offdiag_penalty(W) == so_penalty(W)``.
    """
    with torch.autocast(weight.device.type, enabled=False):
        m = _short_side_matrix(weight)
        return (m.pow(2).sum(dim=1) - 1.0).pow(2).sum()


def so_offdiag_penalty(weight: Tensor) -> Tensor:
    """The off-diagonal part of SO: ``sum_{i != j} G_ij^2 = ||M M^T||_F^2 - sum_i ||m_i||^4``
    (a control, not in He et al. or Bansal et al.).

    With ``M`` and ``m_i`` as in :func:`so_diag_penalty`, ``G_ij = <m_i, m_j>`` for ``i != j``:
    the penalty is zero exactly when the ``m_i`` are mutually orthogonal, whatever their norms
    (it decorrelates, it does not normalize). Its gradient is ``4 (G - diag(G)) M``, the
    difference of SO's ``4 G M`` and the diagonal part's ``4 diag(G) M``; ``G - diag(G)`` is also
    the off-diagonal of ``M M^T``, since ``I`` is diagonal. When ``G = W^T W - I`` the gradient
    with respect to ``W`` is ``4 W (G - diag(G))``. The off-diagonal is masked rather than
    ``SO - SO_diag`` subtracted, which would lose the small off-diagonal of a weight whose norms
    are far from 1 to cancellation.
    """
    gram = smaller_side_gram(weight)
    return (gram - torch.diag_embed(torch.diagonal(gram))).pow(2).sum()


def mc_penalty(weight: Tensor) -> Tensor:
    """Mutual coherence (MC) of Bansal, Chen & Wang (2018), eq. (4).

    ``MC(W) = max_{i != j} |<w_i, w_j>| / (||w_i|| ||w_j||)``: the largest absolute off-diagonal
    entry of the Gram of the l2-normalized vectors of the smaller side (rows if
    ``out <= in*prod(kernel)``, else columns). It lies in ``[0, 1]``, is zero when those vectors
    are mutually orthogonal, and does not depend on their lengths.
    """
    with torch.autocast(weight.device.type, enabled=False):
        return _mutual_coherence(_short_side_matrix(weight))


def srip_penalty(
    weight: Tensor,
    n_power_iterations: int = 20,
    vector: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Spectral restricted isometry property (SRIP) of Bansal, Chen & Wang (2018), eq. (5).

    ``SRIP(W) = sigma(G)``, the spectral norm of the smaller-side Gram minus the identity
    (not squared). ``G`` is symmetric, so ``sigma(G) = max_i |lambda_i(G)|`` and power iteration
    ``v <- G v / ||G v||`` from a random vector finds its top eigenvector; the penalty is then
    ``||G v||`` with ``v`` held constant, whose gradient is ``sign(lambda) v^T dG v``, the gradient
    of the spectral norm at convergence.

    Args:
        weight: a weight of shape ``(out, in, *kernel)``.
        n_power_iterations: power-iteration steps (no gradient flows through them). Bansal et al.
            take 2 from a fresh random vector each step; a stateless call needs more to be
            accurate. :class:`OrthogonalityRegularizer` keeps the vector between steps instead.
        vector: a start vector of length ``min(out, in*prod(kernel))``; random if ``None``.
        generator: random generator for the start vector.
    """
    gram = smaller_side_gram(weight)
    with torch.no_grad():
        if vector is None:
            vector = torch.randn(
                gram.shape[0], dtype=gram.dtype, device=gram.device, generator=generator
            )
        v = F.normalize(vector.to(gram.dtype), dim=0)
        for _ in range(n_power_iterations):
            v = F.normalize(gram @ v, dim=0)
    return torch.linalg.vector_norm(gram @ v)


#: Each penalty of one weight, by kind (``per_layer``).
_FUNCTIONAL: dict[str, Callable[[Tensor], Tensor]] = {
    "so": so_penalty,
    "srip": srip_penalty,
    "dso": dso_penalty,
    "mc": mc_penalty,
    "so_diag": so_diag_penalty,
    "so_offdiag": so_offdiag_penalty,
}


def _check_kind(kind: str) -> str:
    if kind not in PENALTY_KINDS:
        raise ValueError(
            f"unknown orthogonality penalty {kind!r}; valid kinds are {', '.join(PENALTY_KINDS)}"
        )
    return kind


# ----------------------------------------------------------------------------------------------
# Which weights are regularized
# ----------------------------------------------------------------------------------------------
def _compile_patterns(patterns: str | Iterable[str] | None) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    return [re.compile(p) for p in patterns]


def regularized_weights(
    module: nn.Module,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> list[tuple[str, Tensor]]:
    """The weights OR acts on inside ``module``, as ``(qualified name, parameter)`` pairs.

    Selected: the ``weight`` of every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` (subclasses
    included) and the input projections of ``nn.MultiheadAttention`` (``in_proj_weight``, the
    packed query-key-value matrix of shape ``(3 d, d)``, or its three separate parts). Biases,
    normalization layers, embeddings, class tokens and position embeddings are never selected.

    Args:
        module: the encoder (backbone). Build it on the backbone only: projector, predictor and
            EMA target are not part of the paper's regularizer.
        include: regular expressions; if given, a weight is kept only if one matches its name
            (``re.search``).
        exclude: regular expressions; a weight whose name matches one is dropped.
    """
    keep, drop = _compile_patterns(include), _compile_patterns(exclude)
    selected: list[tuple[str, Tensor]] = []
    seen: set[int] = set()
    for module_name, sub in module.named_modules():
        names: list[str] = []
        if isinstance(sub, _REGULARIZED_LAYERS):
            names = ["weight"]
        elif isinstance(sub, nn.MultiheadAttention):
            names = [n for n in _ATTENTION_WEIGHTS if getattr(sub, n, None) is not None]
        for attr in names:
            param = getattr(sub, attr)
            if not isinstance(param, Tensor) or id(param) in seen:
                continue
            name = f"{module_name}.{attr}" if module_name else attr
            if keep and not any(p.search(name) for p in keep):
                continue
            if any(p.search(name) for p in drop):
                continue
            seen.add(id(param))
            selected.append((name, param))
    return selected


# ----------------------------------------------------------------------------------------------
# The fast path: SO and its two parts with closed-form gradients
# ----------------------------------------------------------------------------------------------
class _SoftOrthogonality(torch.autograd.Function):
    """``sum_l ||M_l M_l^T - I||_F^2`` over wide matrices ``M_l`` (float32 or float64 views).

    Forward: one Gram per matrix, then the squared Frobenius norms of all ``G_l`` in one foreach
    reduction. Backward: the closed form ``dSO/dM = 4 G M``, one product per matrix, scaled by one
    foreach op, instead of autograd through the Gram, which costs two. Stacking equally shaped
    matrices for batched products is slower on the CPU: the stack copies every weight. The
    foreach ops keep the host's op count low on a GPU, where a step is bound by its launches
    (measurements: results/benchmarks/NOTES.md#so-closed-form-gradient).
    """

    @staticmethod
    def forward(ctx: Any, *mats: Tensor) -> Tensor:
        grams = []
        for m in mats:
            g = m @ m.t()
            g.diagonal().sub_(1.0)
            grams.append(g)
        ctx.save_for_backward(*mats, *grams)
        return torch.stack(torch._foreach_norm(grams)).square().sum()

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor, ...]:
        (grad_output,) = grad_outputs  # one scalar output
        saved = ctx.saved_tensors
        mats, grams = saved[: len(saved) // 2], saved[len(saved) // 2 :]
        products = [g @ m for m, g in zip(mats, grams)]
        torch._foreach_mul_(products, 4.0 * grad_output)
        return tuple(products)


class _OffDiagonalSoftOrthogonality(_SoftOrthogonality):
    """``sum_l sum_{i != j} (M_l M_l^T)_ij^2``: SO's off-diagonal part over wide matrices ``M_l``.

    SO's function with the Gram's diagonal zeroed instead of lowered by 1: the saved matrix is
    then ``G - diag(G)`` and SO's backward ``4 (G - diag(G)) M`` is exactly this part's gradient
    (see :func:`so_offdiag_penalty`), so only the forward differs (with SO's signature, so
    that no override is at odds with a typed parent).
    """

    @staticmethod
    def forward(ctx: Any, *mats: Tensor) -> Tensor:
        grams = []
        for m in mats:
            g = m @ m.t()
            g.diagonal().zero_()
            grams.append(g)
        ctx.save_for_backward(*mats, *grams)
        return torch.stack(torch._foreach_norm(grams)).square().sum()


class _DiagonalSoftOrthogonality(_SoftOrthogonality):
    """``sum_l sum_i (||m_{l,i}||^2 - 1)^2``: SO's diagonal part over wide matrices ``M_l``.

    The diagonal of ``M M^T - I`` is the rows' squared norms minus 1, so no Gram is formed: one
    row-norm reduction per matrix (``O(n m)`` instead of the Gram's ``O(n^2 m)``), then foreach
    ops over the layers. Backward: the closed form ``4 diag(G) M``, each row scaled by its
    ``G_ii``, one broadcast product per matrix, scaled by one foreach op. Both are its own; it
    derives from SO's function for the signatures only (matrices in, a scalar out), so that its
    overrides match their parent's.
    """

    @staticmethod
    def forward(ctx: Any, *mats: Tensor) -> Tensor:
        norms = [torch.linalg.vector_norm(m, dim=1) for m in mats]
        diagonals = torch._foreach_mul(norms, norms)
        torch._foreach_sub_(diagonals, 1.0)
        ctx.save_for_backward(*mats, *diagonals)
        return torch.stack(torch._foreach_norm(diagonals)).square().sum()

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor, ...]:
        (grad_output,) = grad_outputs  # one scalar output
        saved = ctx.saved_tensors
        mats, diagonals = saved[: len(saved) // 2], saved[len(saved) // 2 :]
        products = [d.unsqueeze(1) * m for m, d in zip(mats, diagonals)]
        torch._foreach_mul_(products, 4.0 * grad_output)
        return tuple(products)


class _SpectralRestrictedIsometry(torch.autograd.Function):
    """``sum_l ||(M_l M_l^T - I) v_l||`` over wide matrices ``M_l`` and fixed unit vectors
    ``v_l`` (SRIP after the power iteration; ``apply(n, *mats, *vectors)``).

    With ``w = M^T v``, ``G v = M w - v`` (one ``mv`` and one ``addmv``) and ``u = G v / ||G v||``:
    ``d||G v|| = u^T (dM M^T + M dM^T) v``, so the gradient is ``u w^T + v (M^T u)^T``, one
    ``mv``, one ``outer`` and one ``addr`` per matrix (``0`` where ``G v = 0``), scaled by one
    foreach op: fewer host ops than autograd through the products (benchmarks/step_profile.py).
    """

    @staticmethod
    def forward(ctx: Any, n: int, *tensors: Tensor) -> Tensor:
        mats, vectors = tensors[:n], tensors[n:]
        ws = [torch.mv(m.t(), v) for m, v in zip(mats, vectors)]
        gvs = [torch.addmv(v, m, w, beta=-1) for m, v, w in zip(mats, vectors, ws)]
        norms = torch._foreach_norm(gvs)
        us = torch._foreach_div(gvs, torch._foreach_clamp_min(norms, 1e-12))
        ctx.n = n
        ctx.save_for_backward(*mats, *vectors, *ws, *us)
        return torch.stack(norms).sum()

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        (grad_output,) = grad_outputs  # one scalar output
        n, saved = ctx.n, ctx.saved_tensors
        mats, vectors, ws, us = (saved[i * n : (i + 1) * n] for i in range(4))
        grads = [
            torch.addr(torch.outer(u, w), v, torch.mv(m.t(), u))
            for m, v, w, u in zip(mats, vectors, ws, us)
        ]
        torch._foreach_mul_(grads, grad_output)
        return (None, *grads, *(None for _ in range(n)))


class OrthogonalityRegularizer(nn.Module):
    """``gamma * sum_l OR(W_l)`` over the conv and linear weights of an encoder.

    The regularizer of He, Du & Ma (NeurIPS 2024), with the penalties of Bansal, Chen & Wang
    (NeurIPS 2018): SO ``||G||_F^2``, SRIP ``sigma(G)``, DSO and MC, and SO's two parts as
    controls, ``so_diag`` ``sum_i G_ii^2`` (norms only) and ``so_offdiag`` ``sum_{i != j} G_ij^2``
    (decorrelation only); see the functional penalties in this module for each formula. Build it
    on the online backbone only; calling it returns a differentiable scalar to add to the SSL
    loss::

        regularizer = OrthogonalityRegularizer(backbone, kind="so", gamma=1e-6)
        loss = ssl_loss + regularizer()

    Computation is in float32 (float64 if the weights are), also under autocast, and never
    synchronizes with the host. SO and its off-diagonal part use closed-form gradients; its
    diagonal part needs only the row norms, no Gram. SRIP never forms ``G``: it applies
    ``G v = W (W^T v) - v`` and keeps one power-iteration vector per layer in a buffer, updated
    ``n_power_iterations`` times per call (one suffices during training, as in
    ``torch.nn.utils.parametrizations.spectral_norm``); the vectors are saved in ``state_dict``.

    Args:
        module: the encoder whose weights are regularized (not stored as a submodule, so this
            module's ``state_dict`` holds only the SRIP vectors).
        kind: ``"so"``, ``"srip"``, ``"dso"``, ``"mc"``, ``"so_diag"`` or ``"so_offdiag"``.
        gamma: the weight of the term; ``None`` takes :data:`DEFAULT_GAMMA` for ``kind``.
        include, exclude: regular expressions on weight names, see :func:`regularized_weights`.
        n_power_iterations: SRIP power-iteration steps per call.
    """

    def __init__(
        self,
        module: nn.Module,
        kind: PenaltyKind | str = "so",
        gamma: float | None = None,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
        n_power_iterations: int = 1,
    ) -> None:
        super().__init__()
        self.kind = _check_kind(kind)
        self.gamma = DEFAULT_GAMMA[self.kind] if gamma is None else float(gamma)
        if n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be >= 1, got {n_power_iterations}")
        self.n_power_iterations = n_power_iterations
        selected = regularized_weights(module, include, exclude)
        if not selected:
            raise ValueError(
                f"{type(module).__name__} has no weight to regularize: OR acts on the weights of "
                f"nn.Conv1d/2d/3d, nn.Linear and nn.MultiheadAttention"
                + (" matching the include/exclude filters" if include or exclude else "")
            )
        self.names: list[str] = [name for name, _ in selected]
        # Plain list: the encoder's parameters must not become this module's parameters.
        self._weights: list[Tensor] = [w for _, w in selected]
        if self.kind == "srip":
            for name, w in selected:
                n = min(w.shape[0], w[0].numel())
                v = torch.randn(n, device=w.device, dtype=_compute_dtype(w))
                self.register_buffer(self._vector_name(name), F.normalize(v, dim=0))

    @staticmethod
    def _vector_name(weight_name: str) -> str:
        return "srip_v__" + weight_name.replace(".", "__")

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, gamma={self.gamma:g}, layers={len(self.names)}"

    def _wide_views(self) -> list[Tensor]:
        """Each weight's matrix view in the compute dtype, transposed (a view) if tall."""
        views = []
        for w in self._weights:
            m = w.reshape(w.shape[0], -1)
            dtype = _compute_dtype(w)
            m = m if m.dtype == dtype else m.to(dtype)  # (no op dispatched when it is already)
            views.append(m.t() if m.shape[0] > m.shape[1] else m)
        return views

    def penalty(self) -> Tensor:
        """``sum_l OR(W_l)`` without ``gamma``."""
        with torch.autocast(self._weights[0].device.type, enabled=False):
            mats = self._wide_views()
            if self.kind == "srip":
                return self._srip(mats)
            if self.kind == "mc":
                coherences = [_mutual_coherence(m) for m in mats]
                return torch.stack(coherences).sum()
            if self.kind == "so_diag":
                return _DiagonalSoftOrthogonality.apply(*mats)
            if self.kind == "so_offdiag":
                return _OffDiagonalSoftOrthogonality.apply(*mats)
            so = _SoftOrthogonality.apply(*mats)
            if self.kind == "dso":
                return 2.0 * so + float(sum(m.shape[1] - m.shape[0] for m in mats))
            return so

    def forward(self) -> Tensor:
        """``gamma * sum_l OR(W_l)``, a differentiable scalar."""
        return self.gamma * self.penalty()

    def per_layer(self) -> dict[str, Tensor]:
        """Each layer's penalty (without ``gamma``), by weight name; SRIP vectors are not
        updated."""
        fn = _FUNCTIONAL[self.kind]
        out = {}
        for name, w in zip(self.names, self._weights):
            if self.kind == "srip":
                v = getattr(self, self._vector_name(name))
                out[name] = srip_penalty(w, n_power_iterations=0, vector=v)
            else:
                out[name] = fn(w)
        return out

    def _srip(self, mats: list[Tensor]) -> Tensor:
        """Sum over layers of ``||G v||`` after power iteration on the persistent vectors ``v``.

        ``G v`` is applied as ``M (M^T v) - v`` on the wide view ``M`` (one ``mv`` and one
        ``addmv``): two matrix-vector products on the weight itself, no Gram and no copy
        (stacking the weights for batched products copies every weight). Norms, rescaling and
        the vector update are foreach ops over all layers, so the host issues a few ops per
        layer and step, far fewer than one layer at a time. The penalty's gradient is in closed
        form (:class:`_SpectralRestrictedIsometry`); together these halve the OR term's cost
        against a per-layer version with autograd
        (measurements: results/benchmarks/NOTES.md#srip-foreach).
        """
        vectors = [getattr(self, self._vector_name(name)) for name in self.names]
        aligned = all((b.device, b.dtype) == (m.device, m.dtype) for b, m in zip(vectors, mats))
        with torch.no_grad():
            v: list[Tensor] | tuple[Tensor, ...] = (
                vectors if aligned else [b.to(m.device, m.dtype) for b, m in zip(vectors, mats)]
            )
            for _ in range(self.n_power_iterations):
                gv = [_gram_minus_identity_times(m, x) for m, x in zip(mats, v)]
                norms = torch._foreach_norm(gv)
                scaled = torch._foreach_div(gv, torch._foreach_clamp_min(norms, 1e-12))
                # Keep the old vector where G v vanishes (an exactly orthogonal W): lerp with
                # weight 1 returns the old vector exactly, with weight 0 the new one.
                keep = (torch.stack(norms) <= 1e-12).to(mats[0].dtype).unbind()
                v = torch._foreach_lerp(scaled, v, list(keep))
            if aligned:
                torch._foreach_copy_(vectors, v)
            else:
                for name, buf, x in zip(self.names, vectors, v):
                    setattr(self, self._vector_name(name), x.to(buf.dtype).clone())
        return _SpectralRestrictedIsometry.apply(len(mats), *mats, *v)


def _gram_minus_identity_times(m: Tensor, v: Tensor) -> Tensor:
    """``(M M^T - I) v`` without forming the Gram ``M M^T``: ``-v + M (M^T v)`` in one ``addmv``."""
    return torch.addmv(v, m, torch.mv(m.t(), v), beta=-1)


def _mutual_coherence(m: Tensor) -> Tensor:
    """Largest absolute off-diagonal entry of the Gram of the l2-normalized rows of ``m``."""
    u = F.normalize(m, dim=1)
    gram = u @ u.t()
    return (gram - torch.diag_embed(torch.diagonal(gram))).abs().amax()
