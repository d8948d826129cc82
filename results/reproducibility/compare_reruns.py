"""Compare re-runs (run directories under /work/runs12/rerun, made with `python -m or_core pretrain --config <the record's config>` and OMP_NUM_THREADS=1) with the records they repeat; writes results/reproducibility/refactor_reruns.json."""
import json, sys
from pathlib import Path
sys.path.insert(0, "/work/main")
from or_core.provenance import provenance
from or_core.records import write_record

R = Path("/work/runs12/rerun")
FIELDS = ["knn_top1", "knn_top5", "linear_top1", "linear_top5", "val_knn_top1", "raw_pixels_knn_top1",
          "effective_rank", "rankme", "std_of_l2_normalized", "or_so_total", "final_ssl_loss"]

def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())

def history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

def compare(name, ref_summary, ref_history, ref_commit, rerun_dir, note):
    new = summary(rerun_dir)
    fields = {k: {"reference": ref_summary.get(k), "rerun": new.get(k)} for k in FIELDS if k in ref_summary}
    losses = [(a["ssl_loss"], b["ssl_loss"]) for a, b in zip(ref_history, history(rerun_dir))]
    return {"name": name, "note": note, "reference_commit": ref_commit, "rerun_commit": new["git_commit"],
            "rerun_device": new["device"], "fields": fields,
            "per_epoch_ssl_loss": losses,
            "identical": all(v["reference"] == v["rerun"] for v in fields.values()) and all(a == b for a, b in losses)}

rows = []
for name in ["simclr-cifar10-none-s0", "byol-cifar10-none-s0"]:
    rec = json.loads(Path(f"/work/main/results/matrix_cpu_paired/{name}.json").read_text())
    if (R / f"p-{name}" / "summary.json").is_file():
        rows.append(compare(f"results/matrix_cpu_paired/{name}.json", rec["summary"], rec["history"],
                            rec["provenance"]["git_commit"], R / f"p-{name}",
                            "the committed cpu-profile record (made after issue 16 items 1-4 and 6-8), re-run with the "
                            "code after items 5 and 7 and the shared EMA helper, from the record's own config"))
old = R / "o-vicreg-cifar10-none-s0"
rows.append(compare("vicreg cpu_small (config of results/matrix_cpu/vicreg-cifar10-none-s0.json), code before issue 16",
                    summary(old), history(old), summary(old)["git_commit"], R / "vicreg-cifar10-none-s0",
                    "the same config run at a170b55 (the last commit before issue 16's first) and after the refactor"))
nov = json.loads(Path("/work/main/results/matrix_cpu/vicreg-cifar10-none-s0.json").read_text())
rows.append(compare("results/matrix_cpu/vicreg-cifar10-none-s0.json", nov["summary"], nov["history"],
                    nov["provenance"]["git_commit"], R / "vicreg-cifar10-none-s0",
                    "the committed cpu-small record of 2026-11-25 re-run: it differs from its first epoch; so does the "
                    "same config at a170b55 and at the record's own commit c528be09 on this machine (first-epoch "
                    "losses in same_commit_here): the CPU differs, not the code"))
bisect = {}
for line in Path("/work/runs12/bisect.log").read_text().splitlines():
    commit, loss = line.split()
    bisect[commit] = float(loss)
rows[-1]["same_commit_here"] = {"commit": "c528be0", "epoch_1_ssl_loss_here": bisect["c528be0"],
                                "epoch_1_ssl_loss_recorded": nov["history"][0]["ssl_loss"],
                                "first_epoch_losses_of_commits_between_c528be0_and_a170b55": bisect,
                                "how": "python -m or_core pretrain --config <the record's config> --stop-after-epochs 1, "
                                       "OMP_NUM_THREADS=1, at each commit"}
nov = json.loads(Path("/work/main/results/matrix_cpu/simclr-cifar10-none-s0.json").read_text())
rows.append(compare("results/matrix_cpu/simclr-cifar10-none-s0.json", nov["summary"], nov["history"],
                    nov["provenance"]["git_commit"], R / "simclr-cifar10-none-s0", "as above, SimCLR"))
record = {"name": "refactor_reruns",
          "what": "Re-runs of recorded trainings with later code, on one thread of a 2-core x86_64 CPU as the records "
                  "were made: every summary number and every epoch's loss compared for equality",
          "rows": rows,
          "provenance": provenance("python results/reproducibility/compare_reruns.py (re-runs: python -m or_core pretrain "
                                   "--config <the record's config> with OMP_NUM_THREADS=1)")}
out = Path("/work/main/results/reproducibility/refactor_reruns.json")
out.parent.mkdir(parents=True, exist_ok=True)
write_record(out, record)
for r in rows:
    print(r["identical"], r["name"], r["reference_commit"][:8], "->", r["rerun_commit"][:8])
