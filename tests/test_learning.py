"""The cpu_small profile learns: BYOL with SO on the real CIFAR-10, against its own untrained
encoder.

One full cpu_small-profile run (a few minutes on two cores; the cpu profile takes about 18, too
long for the suite, and its pilots are checked in tests/test_cpu_profile.py): the kNN top-1 of the final encoder must
beat the same backbone at its random initialization (same seed, same evaluation: both measured
here) by a clear margin, and so must the linear probe.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from or_core.config import resolve_config
from or_core.train import build_run, evaluate_run, pretrain

#: At least this many points of kNN top-1 above the untrained encoder (measured: see the
#: profile's records in results/cpu_profile/).
MARGIN = 0.05


def test_cpu_profile_byol_with_so_beats_its_random_initialization(cifar10_dir: Path, tmp_path: Path) -> None:
    cfg = resolve_config(
        "cpu_small", overrides={"method": "byol", "regularizer": "so", "dataset": "cifar10", "data_root": str(cifar10_dir.parent)}
    )
    untrained = evaluate_run(build_run(cfg), [], 0.0)
    trained = pretrain(cfg, tmp_path / "byol-so", show_progress=False)
    artifacts = Path(os.environ.get("OR_CORE_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts"))
    (artifacts / "learning").mkdir(parents=True, exist_ok=True)
    (artifacts / "learning" / "cpu_profile_byol_so.json").write_text(
        json.dumps({"untrained": untrained, "trained": trained}, indent=1)
    )
    print(f"untrained kNN {untrained['knn_top1']:.4f} linear {untrained['linear_top1']:.4f}; "
          f"trained kNN {trained['knn_top1']:.4f} linear {trained['linear_top1']:.4f} "
          f"in {trained['wall_time_s']:.0f} s of training")
    assert trained["knn_top1"] > untrained["knn_top1"] + MARGIN
    assert trained["linear_top1"] > untrained["linear_top1"] + MARGIN
