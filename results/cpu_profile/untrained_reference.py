"""The untrained reference of the cpu profile's CIFAR-10 records made before records carried their
own (``untrained_knn_top1``, added to every summary by ``or_core.evaluate.evaluate_run``): the kNN
of the encoder every method's run of a seed starts from, on the same evaluation images, with raw
pixels beside it.

    python results/cpu_profile/untrained_reference.py results/cpu_profile/untrained_encoder_cifar10.json 0
"""
import sys, time, json
from pathlib import Path
import torch
from or_core.config import fit_to_data, resolve_config
from or_core.evaluate import untrained_knn, raw_pixel_knn
from or_core.training_run import build_run
from or_core.provenance import provenance
from or_core.records import write_record
out = Path(sys.argv[1])
start = time.perf_counter()
rows = []
for seed in [int(s) for s in sys.argv[2:]]:
    cfg = fit_to_data(resolve_config("cpu", overrides={"method": "byol", "dataset": "cifar10", "seed": seed}), notify=False)
    run = build_run(cfg)
    root = Path(cfg.data_root).expanduser()
    rows.append({"seed": seed, "untrained_knn_top1": untrained_knn(run, root), "raw_pixels_knn_top1": raw_pixel_knn(run, root),
                 "eval_train_images": cfg.eval_train_subset, "eval_test_images": cfg.eval_test_subset})
    print(rows[-1], flush=True)
record = {
    "name": "untrained_encoder_cifar10",
    "what": "kNN top-1 (k, t of the cpu profile) of the cpu profile's encoder untrained (the initial weights of every "
            "method's run of that seed: or_core.training_run.initial_backbone), on the evaluation images of the cpu "
            "profile's CIFAR-10 runs; raw pixels on the same images beside it",
    "profile": "cpu", "backbone": cfg.backbone, "width": cfg.width, "knn_k": cfg.knn_k, "knn_t": cfg.knn_t,
    "rows": rows,
    "provenance": provenance("python results/cpu_profile/untrained_reference.py " + " ".join(sys.argv[1:]),
                             time.perf_counter() - start),
}
write_record(out, record)
