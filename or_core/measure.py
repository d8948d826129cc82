"""A trained run measured: its final model back from the run directory, and the paper's collapse
diagnostics of its encoder.

* :func:`load_trained`: the trained method of a run directory (backbone and heads, the weights
  of its last checkpoint, in eval mode), built without its data, optimizer or compilation;
* :func:`collapse_spectra`: the spectra of Figures 2 and 3 of He, Du & Ma (weights, hidden
  features per stage, representation) of one encoder, as plain lists for a record
  (:mod:`or_core.records`).

Example::

    from or_core.measure import collapse_spectra, load_trained

    trained = load_trained("runs/byol-so")
    feats = trained.features(test_images)            # (N, D), as the run's evaluation sees them
    spectra = collapse_spectra(trained.backbone, test_images, trained.mean, trained.std)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from or_core.backbones import build_backbone
from or_core.checkpoint import load_run_checkpoint
from or_core.config import PretrainConfig
from or_core.diagnostics import (
    REPRESENTATION,
    covariance_eigenvalues,
    effective_rank,
    features,
    normalized_spectrum,
    weight_spectra,
)
from or_core.evaluate import extract_features, normalized_batches
from or_core.methods import SSLMethod, build_method, method_class
from or_core.orthogonality import regularized_weights, so_penalty
from or_core.run_files import CHECKPOINT_FILE, SUMMARY_FILE
from or_core.training_run import select_device

__all__ = ["TrainedRun", "load_trained", "stage_names", "collapse_spectra"]


@dataclass(frozen=True, kw_only=True)
class TrainedRun:
    """The trained method of a run directory and what it takes to feed it images.

    ``method``: backbone and heads with the weights of the run's last checkpoint, in eval
    mode; ``mean``/``std``: the normalization of its training views; ``image_size``: the side
    of its training images; ``epoch``: the epochs the checkpoint holds.
    """

    cfg: PretrainConfig
    method: SSLMethod
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    epoch: int
    device: torch.device

    @property
    def backbone(self) -> nn.Module:
        """The encoder whose output is the representation."""
        return self.method.backbone

    def features(self, images: Tensor, batch_size: int = 512) -> Tensor:
        """Backbone features ``(N, D)`` of uint8 images ``(N, 3, H, W)``, as the run's
        evaluation computes them (:func:`or_core.evaluate.extract_features`)."""
        return extract_features(self.backbone, images, self.mean, self.std, batch_size, self.device, amp=self.cfg.amp)


def _image_size(cfg: PretrainConfig, out: Path) -> int:
    """The side of the run's training images: the config's, else its summary's, else that of
    one image of its data set (a run trained at the data's own size whose evaluation has not run)."""
    if cfg.image_size is not None:
        return int(cfg.image_size)
    summary = out / SUMMARY_FILE
    if summary.is_file():
        size = json.loads(summary.read_text()).get("image_size")
        if size:
            return int(size)
    from or_core.data import load_split_at_most

    root = Path(cfg.data_root).expanduser()
    return int(load_split_at_most(cfg.dataset, "test", root, None, 1, cfg.seed).images.shape[-1])


def load_trained(run_dir: str | Path, device: str | torch.device | None = None) -> TrainedRun:
    """The trained method of the run in ``run_dir``: backbone and heads built from the
    checkpoint's own config, the checkpoint's weights loaded, eval mode, on ``device``
    (default: the run's ``device`` setting). Nothing else of the run is built: no data is
    loaded, no optimizer or schedule made, nothing compiled.

    Raises:
        MissingPathError: ``run_dir`` or its checkpoint does not exist.
    """
    out = Path(run_dir)
    state, saved = load_run_checkpoint(out)
    cfg = PretrainConfig.from_dict(saved, str(out / CHECKPOINT_FILE))
    image_size = _image_size(cfg, out)
    backbone, feature_dim = build_backbone(cfg.backbone, image_size=image_size, width=cfg.width)
    sizes = method_class(cfg.method).sizes_from_state(state["method"])  # e.g. DeepCluster V2's memory rows
    method = build_method(cfg.method, backbone, feature_dim, regularizer=cfg.regularizer, gamma=cfg.gamma,
                          **cfg.method_kwargs, **sizes)
    method.load_state_dict(state["method"])
    device = select_device(cfg.device) if device is None else torch.device(device)
    method.to(device).eval()
    views = method.views(image_size, n_local_views=method.num_local_views)
    return TrainedRun(
        cfg=cfg, method=method, mean=tuple(views[0].mean), std=tuple(views[0].std), image_size=image_size,
        epoch=int(state["epoch"]), device=device,
    )


def stage_names(backbone: nn.Module) -> list[str]:
    """The hidden layers whose features the paper's Figure 3 shows: a ResNet's four stages
    (``layer1`` ... ``layer4``), or four evenly spaced blocks of a torchvision ViT."""
    names = dict(backbone.named_modules())
    resnet = [f"layer{i}" for i in range(1, 5)]
    if all(n in names for n in resnet):
        return resnet
    blocks = [n for n in names if n.startswith("encoder.layers.") and n.count(".") == 2]
    if blocks:
        step = max(1, len(blocks) // 4)
        return blocks[step - 1 :: step][:4]
    raise ValueError(f"no ResNet stages or ViT blocks in {type(backbone).__name__}")


def _floats(x: Tensor, digits: int = 6) -> list[float]:
    return [float(f"{v:.{digits}g}") for v in x.double().tolist()]


@torch.no_grad()
def collapse_spectra(
    backbone: nn.Module,
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    layers: Sequence[str] | None = None,
    batch_size: int = 500,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """The paper's collapse diagnostics of one encoder, as plain lists for a JSON record.

    * ``weights``: for every regularized weight ``W`` (matrix view), the eigenvalues of its
      smaller-side Gram, ``s_i^2`` for the singular values ``s_i``, divided by the largest;
    * ``so``: ``||G||_F^2`` of each weight (the orthogonality error that SO minimizes);
    * ``hidden``: for each layer in ``layers`` (default :func:`stage_names`), the eigenvalues of
      the covariance of its globally pooled output over ``images``, divided by the largest;
    * ``representation``: the same for the encoder's output;
    * ``effective_rank``: of each pooled hidden feature and of the representation.

    ``images`` are uint8 ``(N, 3, H, W)`` test images, normalized with the training
    ``mean``/``std`` as for every evaluation (:func:`or_core.evaluate.normalized_batches`);
    every spectrum is sorted descending (Figures 2 and 3 of He, Du & Ma).
    """
    layers = list(layers) if layers is not None else stage_names(backbone)
    weights = {
        name.removesuffix(".weight"): _floats(normalized_spectrum(s.double() ** 2))
        for name, s in weight_spectra(backbone).items()
    }
    so = {
        name.removesuffix(".weight"): float(so_penalty(w.detach().double()))
        for name, w in regularized_weights(backbone)
    }
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    rows = features(backbone, normalized_batches(images, mean, std, batch_size, device), layers, device=device)
    spectra = {name: normalized_spectrum(covariance_eigenvalues(x)) for name, x in rows.items()}
    return {
        "images": int(images.shape[0]),
        "weights": weights,
        "so": so,
        "hidden": {name: _floats(spectra[name]) for name in layers},
        "representation": _floats(spectra[REPRESENTATION]),
        "effective_rank": {name: effective_rank(x) for name, x in rows.items()},
    }
