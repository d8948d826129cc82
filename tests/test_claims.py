"""The paper's claims against the committed cpu-scale records (``results/matrix_cpu/``).

These tests train nothing: they read the records that ``python -m or_core matrix
configs/matrix_cpu.yaml`` committed and assert what holds in them. The matrix fills in over
time; a claim whose runs are not recorded yet is skipped with the names it waits for, and a new
record that contradicts a claim asserted here fails the suite, so that the book's statements
(computed by :func:`or_core.report.claims` in notebook 05) and these tests move together.

Verdicts follow :mod:`or_core.stats`: per comparison (method, data set, regularizer), the mean of
the paired differences over seeds and its paired-t 95% interval; one seed gives no verdict.
``test_claim_verdicts_are_those_the_records_support`` recomputes every comparison from the raw
records, independently of :mod:`or_core.report`, and a literal pins the BYOL/CIFAR-10/SO
comparison (three seeds). The tests of single pairs further down state what each pair shows,
which is no verdict.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from or_core import report
from or_core.experiments import load_matrix, run_name
from or_core.records import load_records

REPO = Path(__file__).resolve().parents[1]
MATRIX = REPO / "configs" / "matrix_cpu.yaml"
RESULTS = REPO / "results" / "matrix_cpu"


def _records() -> list[dict]:
    return load_records(RESULTS) if RESULTS.is_dir() else []


RECORDS = _records()


def _key(record: dict) -> tuple[str, str, int]:
    cfg = record["config"]
    return cfg["method"], Path(cfg["dataset"]).name, cfg["seed"]


def _pairs(min_gamma: float = 0.0) -> Iterator[tuple[dict, dict]]:
    """(run without OR, run with OR) of the same method, data set and seed."""
    baseline = {_key(r): r for r in RECORDS if r["config"]["regularizer"] == "none"}
    for record in RECORDS:
        cfg = record["config"]
        if cfg["regularizer"] != "none" and _key(record) in baseline and record["summary"]["gamma"] >= min_gamma:
            yield baseline[_key(record)], record


def test_every_record_is_a_matrix_run_with_its_scale_and_provenance() -> None:
    if not RECORDS:
        pytest.skip(f"no records in {RESULTS} yet")
    matrix = load_matrix(MATRIX)
    fixed = {e.name for e in matrix.experiments if not e.needs_chosen_gamma}
    chosen = {re.escape(e.name).replace("chosen", r"[0-9e.-]+") for e in matrix.experiments if e.needs_chosen_gamma}
    for record in RECORDS:
        name = record["name"]
        assert Path(record["_path"]).stem == name == run_name(record["config"] | {"gamma": record["summary"]["gamma"]})
        assert name in fixed or any(re.fullmatch(p, name) for p in chosen), f"{name} is not a run of {MATRIX.name}"
        # made before the cpu profile was renamed cpu_small: their config says "cpu"
        assert record["scale"] == "cpu-small" and record["config"]["profile"] in ("cpu", "cpu_small")
        prov = record["provenance"]
        assert re.fullmatch(r"[0-9a-f]{40}", prov["git_commit"]) and prov["git_dirty"] is False, name
        assert {"date_utc", "device", "torch", "lightly", "command", "wall_time_s"} <= set(prov)
        assert len(record["history"]) == record["config"]["epochs"]
        assert len(record["collapse"]["weights"]) == 20 and set(record["collapse"]["hidden"]) == {
            "layer1", "layer2", "layer3", "layer4"}
        summary = record["summary"]
        for metric in ("knn_top1", "knn_top5", "linear_top1", "linear_top5", "val_knn_top1"):
            assert 0.0 <= summary[metric] <= 1.0, (name, metric)


METHODS_RESULTS = REPO / "results" / "methods_cpu"


def test_every_cpu_profile_run_on_cifar10_learns() -> None:
    """Each recorded CIFAR-10 encoder, of the matrix and of every method's cpu-profile run
    (``configs/methods_cpu.yaml``), beats the kNN top-1 of the same backbone untrained, on the
    same evaluation, by more than 5 points (the untrained number is a measured record)."""
    pilots = json.loads((REPO / "results" / "cpu_profile" / "pilots_2026-11-25b.json").read_text())
    untrained = next(r for r in pilots["runs"] if r["label"] == "P1_w125_s32")["untrained_same_backbone"]["knn_top1"]
    methods = load_records(METHODS_RESULTS) if METHODS_RESULTS.is_dir() else []
    cifar10 = [r for r in RECORDS + methods if Path(r["config"]["dataset"]).name == "cifar10"]
    if not cifar10:
        pytest.skip(f"no CIFAR-10 records in {RESULTS} yet")
    weak = [(r["name"], r["summary"]["knn_top1"]) for r in cifar10 if r["summary"]["knn_top1"] < untrained + 0.05]
    assert not weak, f"untrained kNN top-1 {untrained:.3f}"


@pytest.mark.parametrize(("regularizer", "min_gamma"), [("so", 1e-5), ("srip", 1e-3)])
def test_or_lowers_the_final_orthogonality_error(regularizer: str, min_gamma: float) -> None:
    """OR's own objective: with SO or SRIP at the largest gamma of the paper's grid (the gamma the
    validation split chose for both) or above, the SO penalty summed over the final backbone
    weights is below that of the same run without OR (same method, data set and seed)."""
    pairs = [(a, b) for a, b in _pairs(min_gamma) if b["config"]["regularizer"] == regularizer]
    if not pairs:
        pytest.skip(f"no recorded pair (none, {regularizer} with gamma >= {min_gamma:g}) of the same run yet")
    higher = [(b["name"], b["summary"]["or_so_total"], a["summary"]["or_so_total"])
              for a, b in pairs if b["summary"]["or_so_total"] >= a["summary"]["or_so_total"]]
    assert not higher, f"(run, its error, the error without OR): {higher}"


def _weight_flatness(record: dict) -> float:
    """Mean over the regularized weights of erank(spectrum) / len(spectrum), where the record
    stores each weight's Gram eigenvalues l_i and erank = exp(-sum p_i log p_i) with
    p_i = sqrt(l_i) / sum_j sqrt(l_j) (Roy & Vetterli, on the singular values): 1 for a flat
    spectrum, 1 / len for a single direction."""
    values = []
    for eigenvalues in record["collapse"]["weights"].values():
        s = np.sqrt(np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None))
        p = s[s > 0] / s.sum()
        values.append(float(np.exp(-(p * np.log(p)).sum())) / len(s))
    return float(np.mean(values))


@pytest.mark.parametrize(("regularizer", "min_gamma"), [("so", 1e-5), ("srip", 1e-3)])
def test_or_flattens_the_weight_spectra(regularizer: str, min_gamma: float) -> None:
    """Figure 2 (weights): with SO or SRIP at the chosen gamma (the largest of the paper's grid)
    or above, the weights' Gram spectra end flatter than in the same run without OR (mean
    normalized effective rank over the 20 regularized weights), in every recorded pair."""
    pairs = [(a, b) for a, b in _pairs(min_gamma) if b["config"]["regularizer"] == regularizer]
    if not pairs:
        pytest.skip(f"no recorded pair (none, {regularizer} with gamma >= {min_gamma:g}) of the same run yet")
    flatter = [(b["name"], _weight_flatness(b), _weight_flatness(a)) for a, b in pairs]
    assert not [f for f in flatter if f[1] <= f[2]], f"(run, its flatness, the flatness without OR): {flatter}"


def test_feature_whitening_raises_the_effective_rank_of_the_representation() -> None:
    """Table 1 / Figure 2 (representations): BYOL with VICReg's variance and covariance terms on
    the representation ends with a higher effective rank of its representation than BYOL
    alone (same data set and seed), the collapse that whitening is built to prevent."""
    byol = {_key(r)[1:]: r for r in RECORDS if r["config"]["method"] == "byol" and r["config"]["regularizer"] == "none"}
    pairs = [(byol[_key(r)[1:]], r) for r in RECORDS
             if r["config"]["method"] == "byol_whitening" and _key(r)[1:] in byol]
    if not pairs:
        pytest.skip("no recorded pair of BYOL and BYOL + whitening of the same run yet")
    ranks = [(b["name"], b["summary"]["effective_rank"], a["summary"]["effective_rank"]) for a, b in pairs]
    assert all(white > plain for _, white, plain in ranks), f"(run, its effective rank, BYOL's): {ranks}"


def test_readme_quotes_each_methods_cpu_profile_knn_from_its_record() -> None:
    """The README's per-method cpu-profile kNN top-1 figures are those of the records."""
    names = {"SimCLR": "simclr", "NNCLR": "nnclr", "VICReg": "vicreg", "BYOL + whitening": "byol_whitening",
             "DINO": "dino", "MoCo v2": "mocov2", "SwaV": "swav", "SimSiam": "simsiam",
             "Barlow Twins": "barlowtwins", "BYOL": "byol"}
    records = RECORDS + (load_records(METHODS_RESULTS) if METHODS_RESULTS.is_dir() else [])
    knn = {r["config"]["method"]: r["summary"]["knn_top1"] for r in records
           if r["config"]["regularizer"] == "none" and Path(r["config"]["dataset"]).name == "cifar10"
           and r["config"]["seed"] == 0}
    text = " ".join((REPO / "README.md").read_text().split())
    quoted = dict(re.findall(r"(SimCLR|NNCLR|VICReg|BYOL \+ whitening|DINO|MoCo v2|SwaV|SimSiam|Barlow Twins|BYOL) "
                             r"(0\.\d{3})[,.]", text.split("Every method learns in the cpu profile", 1)[1][:800]))
    assert set(quoted) == set(names), quoted
    for label, value in quoted.items():
        assert float(value) == pytest.approx(knn[names[label]], abs=5.1e-4)  # 2,000 test images: halves round either way, label


H200 = REPO / "results" / "benchmarks" / "h200"
H100 = REPO / "results" / "benchmarks" / "h100"


def _throughput_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["results"]


def _eager_and_compiled(path: Path, regularizer: str) -> str:
    rows = {r["compile"] or "none": r["images_per_s"] for r in _throughput_rows(path) if r["regularizer"] == regularizer}
    return f"{rows['none']:,.0f} | {rows['reduce-overhead']:,.0f}"


def test_readme_quotes_the_gpu_throughputs_from_the_benchmark_files() -> None:
    """The README's GPU table (H100 and H200 columns) and per-method figures are the benchmark
    JSON's, rounded; the H100 rows ran on an H100."""
    text = (REPO / "README.md").read_text()
    table = dict(re.findall(r"^\| (none|SO|SRIP) \| ([\d,]+ \| [\d,]+ \| [\d,]+ \| [\d,]+) \|$", text, flags=re.MULTILINE))
    h100 = H100 / "call1-338ad91" / "throughput_byol.json"
    assert all("H100" in r["device"] for r in _throughput_rows(h100))
    for label, regularizer in (("none", "none"), ("SO", "so"), ("SRIP", "srip")):
        expected = _eager_and_compiled(h100, regularizer) + " | " + _eager_and_compiled(H200 / "call3-c1d8e92" / "throughput_byol.json", regularizer)
        assert table[label] == expected, label
    flat = " ".join(text.split())
    h100_methods = [r["images_per_s"] for r in _throughput_rows(H100 / "call1-338ad91" / "throughput_methods.json")]
    assert f"{min(h100_methods):,.0f}-{max(h100_methods):,.0f} on the H100" in flat
    methods = {r["method"]: r["images_per_s"] for r in _throughput_rows(H200 / "call4-2058d15" / "throughput_methods.json")}
    assert all(r["compile"] == "reduce-overhead" for r in _throughput_rows(H200 / "call4-2058d15" / "throughput_methods.json"))
    for label, method in (("SwaV", "swav"), ("DINO", "dino"), ("NNCLR", "nnclr"), ("BYOL", "byol"), ("Barlow Twins", "barlowtwins")):
        assert f"{label} {methods[method]:,.0f}" in flat, (label, methods[method])
    assert f"{min(methods.values()):,.0f}-{max(methods.values()):,.0f} images/s with SO" in flat


# ----------------------------------------------------------------------------------------------
# Verdicts under the noise model of or_core.stats
# ----------------------------------------------------------------------------------------------
def _erank_ratio(eigenvalues: list[float]) -> float:
    """erank / len of one stored spectrum (see :func:`_weight_flatness`)."""
    s = np.sqrt(np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None))
    p = s[s > 0] / s.sum()
    return float(np.exp(-(p * np.log(p)).sum())) / len(s)


def _hidden_flatness(record: dict) -> float:
    """Mean erank / len over layer1-3: the stages before the last, whose pooled output (layer4)
    is the representation itself and is measured by the representation claim instead."""
    hidden = record["collapse"]["hidden"]
    return float(np.mean([_erank_ratio(hidden[stage]) for stage in ("layer1", "layer2", "layer3")]))


#: claim id -> (the measure of a record, sign: +1 when larger with OR agrees with the claim).
MEASURES = {
    "accuracy_so": (lambda r: r["summary"]["linear_top1"], 1.0, ("so",)),
    "accuracy_srip": (lambda r: r["summary"]["linear_top1"], 1.0, ("srip",)),
    "accuracy_knn": (lambda r: r["summary"]["knn_top1"], 1.0, ("so", "srip")),
    "orthogonality": (lambda r: r["summary"]["or_so_total"], -1.0, ("so", "srip")),
    "weights": (_weight_flatness, 1.0, ("so", "srip")),
    "hidden": (_hidden_flatness, 1.0, ("so", "srip")),
    "representation": (lambda r: r["summary"]["effective_rank"], 1.0, ("so", "srip")),
}


def _expected(claim: str, records: list[dict]) -> dict[tuple[str, str, str], tuple[int, float, str]]:
    """(method, data set, regularizer) -> (seeds, mean difference, verdict), from the raw records:
    every run with OR at the gamma chosen on validation against the run without OR of its seed;
    the verdict from mean +- t_{0.975, n-1} sd / sqrt(n) (sd with ddof=1), none below 2 seeds."""
    measure, sign, regularizers = MEASURES[claim]
    baseline = {_key(r): r for r in records if r["config"]["regularizer"] == "none"}
    deltas: dict[tuple[str, str, str], list[float]] = {}
    for record in records:
        reg = record["config"]["regularizer"]
        if reg in regularizers and record.get("gamma_choice") is not None and _key(record) in baseline:
            method, dataset, _ = _key(record)
            deltas.setdefault((method, dataset, reg), []).append(sign * (measure(record) - measure(baseline[_key(record)])))
    out = {}
    for key, values in deltas.items():
        n, mean = len(values), float(np.mean(values))
        if n < 2:
            out[key] = (n, mean, "too few seeds")
            continue
        half = scipy_stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n)
        verdict = "supported" if mean - half > 0 else "contradicted" if mean + half < 0 else "no detectable effect"
        out[key] = (n, mean, verdict)
    return out


def _claims_table(records: list[dict] | None = None):
    records = RECORDS if records is None else records
    return report.claims(report.records_frame(records), records)


PAIRED_RESULTS = REPO / "results" / "matrix_cpu_paired"


def _paired_comparison_records() -> list[dict]:
    """The paired matrix's comparison runs (its selection runs on seed 100 never count)."""
    records = load_records(PAIRED_RESULTS) if PAIRED_RESULTS.is_dir() else []
    return [r for r in records if "selection" not in r["groups"]]


PAIRED_RECORDS = _paired_comparison_records()
MATRICES = {"cpu_small": (RECORDS, RESULTS), "cpu_paired": (PAIRED_RECORDS, PAIRED_RESULTS)}


@pytest.mark.parametrize("matrix", list(MATRICES))
@pytest.mark.parametrize("claim", list(MEASURES))
def test_claim_verdicts_are_those_the_records_support(claim: str, matrix: str) -> None:
    """Every comparison of the claims table of each matrix (the cpu-small one, and the paired
    one's comparison runs), recomputed from the raw records: the same comparisons, seeds, mean
    difference (to 1e-9: sums of a few numbers in another order) and verdict, and a claim line
    that counts them."""
    records, folder = MATRICES[matrix]
    if not records:
        pytest.skip(f"no records in {folder} yet")
    expected = _expected(claim, records)
    rows = _claims_table(records).loc[[claim]]
    comparisons = rows[rows["comparison"] != report.ALL_COMPARISONS]
    found = {}
    for _, row in comparisons.iterrows():
        method, dataset, label = row["comparison"].split(" (gamma")[0].split(" / ")
        names = {report.method_label(m): m for m in {k[0] for k in expected}}  # "BYOL" -> "byol"
        datasets = {"CIFAR-10": "cifar10", "CIFAR-100": "cifar100"}
        found[(names[method], datasets.get(dataset, dataset), label.lower())] = (row["seeds"], row["effect"], row["verdict"])
    assert set(found) == set(expected)
    for key, (n, mean, verdict) in expected.items():
        assert found[key][0] == n and found[key][2] == verdict, key
        assert found[key][1] == pytest.approx(mean, rel=1e-9, abs=1e-12), key
    with_interval = [v for n, _, v in expected.values() if n >= 2]
    line = rows[rows["comparison"] == report.ALL_COMPARISONS]["verdict"].iloc[0]
    if with_interval:
        assert line.startswith(f"of {len(with_interval)} comparison") and all(
            f"{name} in {with_interval.count(name)}" in line for name in ("supported", "no detectable effect", "contradicted"))
    few = sum(n < 2 for n, _, _ in expected.values())
    assert (f"{few} comparison" in line) == (few > 0)


def test_byol_cifar10_so_verdicts_over_its_three_seeds() -> None:
    """The one comparison with several seeds (BYOL, CIFAR-10, SO at the chosen 1e-5, seeds 0-2),
    pinned: a change of the rule or of these records shows here. OR lowers the orthogonality
    error beyond the seeds' spread; no accuracy or spectrum difference is detectable with
    three seeds."""
    names = {f"byol-cifar10-{reg}-s{seed}" for reg in ("none", "so-1e-5") for seed in (0, 1, 2)}
    if not names <= {r["name"] for r in RECORDS}:
        pytest.skip(f"waiting for {sorted(names - {r['name'] for r in RECORDS})}")
    table = _claims_table()
    pinned = {"accuracy_so": "no detectable effect", "accuracy_knn": "no detectable effect",
              "seeds": "no detectable effect", "orthogonality": "supported", "weights": "no detectable effect",
              "hidden": "no detectable effect", "representation": "no detectable effect"}
    comparison = "BYOL / CIFAR-10 / SO (gamma 1e-5)"
    for claim, verdict in pinned.items():
        row = table.loc[[claim]].set_index("comparison").loc[comparison]
        assert (row["seeds"], row["verdict"]) == (3, verdict), claim
    orth = table.loc[["orthogonality"]].set_index("comparison").loc[comparison]
    assert orth["95% CI"] == "[+10.64, +40.69]"  # final sum ||G||_F^2: without OR - with, three seeds
    knn = table.loc[["seeds"]].set_index("comparison").loc[comparison]
    assert knn["differences"] == "s0: +0.0265; s1: -0.0005; s2: +0.01"  # 2,000 test images: steps of 0.0005


def test_every_other_comparison_has_one_seed_and_no_verdict() -> None:
    """Apart from BYOL/CIFAR-10/SO, the cpu matrix trains one seed per comparison (and probes
    the transfer of one seed without OR): each gets its difference and "too few seeds"."""
    if not RECORDS:
        pytest.skip(f"no records in {RESULTS} yet")
    table = _claims_table()
    comparisons = table[table["comparison"] != report.ALL_COMPARISONS]
    several = comparisons[comparisons["seeds"] >= 2]
    assert set(several["comparison"]) <= {"BYOL / CIFAR-10 / SO (gamma 1e-5)"}
    assert set(comparisons[comparisons["seeds"] < 2]["verdict"]) <= {"too few seeds"}
    for claim in ("accuracy_srip", "whitening_representation", "whitening_inside", "transfer"):
        line = table.loc[[claim]].set_index("comparison").loc[report.ALL_COMPARISONS, "verdict"]
        assert line.startswith("no comparison with >= 2 seeds"), (claim, line)


def test_the_committed_claims_summary_is_the_records_one() -> None:
    """results/figures/claims_cpu_small.md (written by notebook 05) says what the records say now."""
    if not RECORDS:
        pytest.skip(f"no records in {RESULTS} yet")
    text = (REPO / "results" / "figures" / "claims_cpu_small.md").read_text()
    assert report.claims_summary(_claims_table()) in text and f"from the {len(RECORDS)} records" in text


def test_every_method_at_the_cpu_profile_beats_raw_pixels_and_its_untrained_encoder() -> None:
    """Issues 17 (item 1) and 19 (item 1): each recorded method of group ``methods`` of
    ``configs/matrix_cpu_paired.yaml`` (the cpu profile, no OR, seed 0) ends above kNN on raw
    32x32 pixels and above kNN on the same encoder untrained, both computed on the same
    evaluation images, and the README's table is the one those records give."""
    from or_core import report

    records = [r for r in (load_records(PAIRED_RESULTS) if PAIRED_RESULTS.is_dir() else [])
               if "methods" in r["groups"]]
    if not records:
        pytest.skip(f"no cpu-profile records in {PAIRED_RESULTS} yet")
    table = report.methods_at_profile(records)
    assert table.notna().all().all(), table  # every record has both references
    below = table[(table["kNN top-1"] <= table["raw pixels kNN"]) | (table["kNN top-1"] <= table["untrained kNN"])]
    readme = (REPO / "README.md").read_text()
    # a method that did not learn is shown and said, never dropped: the README names each one
    for method in below["method"]:
        assert f"{method} falls short at this profile" in readme, method
    said = {m for m in report.METHOD_LABELS.values() if f"{m} falls short at this profile" in readme}
    assert said == set(below["method"]), said
    # the references are the same images' for every method of one seed
    assert table["raw pixels kNN"].nunique() == 1 and table["untrained kNN"].nunique() == 1
    own = [r["summary"]["untrained_knn_top1"] for r in records if r["summary"].get("untrained_knn_top1") is not None]
    assert all(v == pytest.approx(report.untrained_knn_by_seed()[0], abs=1e-3) for v in own), own
    assert report.methods_at_profile_markdown(table) in readme


# ----------------------------------------------------------------------------------------------
# The paired matrix of the cpu profile (configs/matrix_cpu_paired.yaml)
# ----------------------------------------------------------------------------------------------
def test_paired_comparisons_use_gammas_chosen_on_validation_of_seeds_they_never_use() -> None:
    """Issue 17, item 2, on the committed records: each comparison run with OR carries the
    choice of its gamma, made on ``val_knn_top1`` (held-out training images, never the test
    split) of selection seeds that no comparison run uses; its candidates are the committed
    selection records' own validation kNN, and the gamma is the best of them."""
    comparisons = [r for r in PAIRED_RECORDS if r["config"]["regularizer"] != "none"]
    if not comparisons:
        pytest.skip(f"no comparison run with OR in {PAIRED_RESULTS} yet")
    selection = {r["name"]: r for r in load_records(PAIRED_RESULTS) if "selection" in r["groups"]}
    comparison_seeds = {r["config"]["seed"] for r in PAIRED_RECORDS}
    for record in comparisons:
        choice, cfg = record["gamma_choice"], record["config"]
        assert choice["metric"] == "val_knn_top1", record["name"]
        assert not set(choice["seeds"]) & comparison_seeds, record["name"]
        for gamma, per_seed in choice["per_seed"].items():
            for seed, value in per_seed.items():
                source = selection[run_name(cfg | {"gamma": float(gamma), "seed": int(seed)})]
                assert value == source["summary"]["val_knn_top1"], source["name"]
            assert choice["candidates"][gamma] == pytest.approx(np.mean(list(per_seed.values())), rel=1e-12)
        chosen = [value for gamma, value in choice["candidates"].items() if float(gamma) == record["summary"]["gamma"]]
        assert chosen == [max(choice["candidates"].values())], record["name"]
        assert record["summary"]["gamma"] == choice["gamma"], record["name"]


def test_the_committed_paired_claims_summary_is_the_records_one() -> None:
    """results/figures/claims_paired.md (written by notebook 05, linked from the README) says what
    the paired matrix's comparison records say now."""
    if not PAIRED_RECORDS:
        pytest.skip(f"no comparison records in {PAIRED_RESULTS} yet")
    text = (REPO / "results" / "figures" / "claims_paired.md").read_text()
    assert report.claims_summary(_claims_table(PAIRED_RECORDS)) in text
    assert f"from the {len(PAIRED_RECORDS)} comparison runs" in text
    missing = len(report.missing_runs(REPO / "configs" / "matrix_cpu_paired.yaml", PAIRED_RESULTS))
    assert f"{missing} runs of the matrix are still missing" in text
    assert "results/figures/claims_paired.md" in (REPO / "README.md").read_text()


def test_paired_byol_so_verdicts_over_seeds_0_to_2() -> None:
    """The paired matrix's first comparison (BYOL, CIFAR-10, SO at gamma 1e-6 chosen on seed 100,
    against BYOL, seeds 0-2), pinned on those three seeds so that later seeds do not move it: no
    claim shows a detectable effect, not even OR's own objective at this gamma and width."""
    names = {f"byol-cifar10-{reg}-s{seed}" for reg in ("none", "so-1e-6") for seed in (0, 1, 2)}
    records = [r for r in PAIRED_RECORDS if r["name"] in names]
    if len(records) < len(names):
        pytest.skip(f"waiting for {sorted(names - {r['name'] for r in records})}")
    table = _claims_table(records)
    comparison = "BYOL / CIFAR-10 / SO (gamma 1e-6)"
    for claim in ("accuracy_so", "accuracy_knn", "seeds", "orthogonality", "weights", "hidden", "representation"):
        row = table.loc[[claim]].set_index("comparison").loc[comparison]
        assert (row["seeds"], row["verdict"]) == (3, "no detectable effect"), claim
    knn = table.loc[["seeds"]].set_index("comparison").loc[comparison]
    assert knn["differences"] == "s0: +0.0086; s1: -0.003; s2: -0.0192"  # 10,000 test images: steps of 1e-4
    assert knn["95% CI"] == "[-0.03922, +0.03015]"


def test_readme_quotes_the_paired_byol_so_comparison_from_the_records() -> None:
    """The README's sentence on the paired matrix (BYOL + SO against BYOL on fresh seeds) quotes
    the number of seeds, the kNN and linear effects and their intervals that the records give,
    rounded to three decimals."""
    if not PAIRED_RECORDS:
        pytest.skip(f"no comparison records in {PAIRED_RESULTS} yet")
    text = " ".join((REPO / "README.md").read_text().split())
    number = r"([+-]?\d\.\d{3})"
    found = re.search(rf"against BYOL on (\w+) fresh seeds changes test kNN top-1 by {number} \(95% CI {number} to "
                      rf"{number}\) and linear top-1 by {number} \({number} to {number}\)", text)
    assert found, "the README's paired sentence is missing or reworded"
    table = _claims_table(PAIRED_RECORDS)
    comparison = next(c for c in table.loc[["accuracy_knn"], "comparison"] if c.startswith("BYOL / CIFAR-10 / SO"))
    words = {2: "two", 3: "three", 4: "four", 5: "five"}
    quoted = [float(v) for v in found.groups()[1:]]
    for claim, (effect, low, high) in (("accuracy_knn", quoted[:3]), ("accuracy_so", quoted[3:])):
        row = table.loc[[claim]].set_index("comparison").loc[comparison]
        assert found.group(1) == words[row["seeds"]], claim
        assert (effect, low, high) == pytest.approx((row["effect"], row["ci_low"], row["ci_high"]), abs=5.1e-4), claim
    bound = re.search(r"a gain of more than (\d+\.\d) points of kNN is ruled out", text)
    knn = table.loc[["accuracy_knn"]].set_index("comparison").loc[comparison]
    if knn["ci_high"] > 0:  # the interval's upper end, in points, is the largest gain it leaves open
        assert bound and float(bound.group(1)) == pytest.approx(100 * knn["ci_high"], abs=0.051)


def test_readme_quotes_byols_seeds_without_or_from_the_records() -> None:
    """The README's BYOL-without-OR figures at the cpu profile (each comparison seed's test kNN
    top-1 and their mean, against the profile's goal of 0.45) are those of the records."""
    runs = sorted((r["config"]["seed"], r["summary"]["knn_top1"]) for r in PAIRED_RECORDS
                  if r["config"]["method"] == "byol" and r["config"]["regularizer"] == "none")
    if len(runs) < 2:
        pytest.skip("fewer than two seeds of BYOL without OR recorded")
    text = " ".join((REPO / "README.md").read_text().split())
    found = re.search(r"it reaches test kNN ([\d., and]+?) on seeds 0 to (\d) .*?, (0\.\d{3}) on average", text)
    assert found, "the README's BYOL seeds sentence is missing or reworded"
    quoted = [float(v) for v in re.findall(r"0\.\d{3}", found.group(1))]
    assert [seed for seed, _ in runs] == list(range(int(found.group(2)) + 1))
    assert quoted == pytest.approx([knn for _, knn in runs], abs=5.1e-4)
    assert float(found.group(3)) == pytest.approx(np.mean([knn for _, knn in runs]), abs=5.1e-4)


def test_readme_quotes_the_paired_byol_srip_comparison_from_the_records() -> None:
    """The README's sentence on BYOL + SRIP against BYOL quotes the seeds and the kNN effect with
    its interval that the records give, and says the weights end closer to orthogonal with
    flatter spectra only while both claims are supported and the features, representation
    and accuracy show no detectable effect."""
    table = _claims_table(PAIRED_RECORDS) if PAIRED_RECORDS else None
    rows = table.loc[["accuracy_knn"]] if table is not None else None
    if rows is None or not any(rows["comparison"].str.startswith("BYOL / CIFAR-10 / SRIP") & (rows["seeds"] >= 2)):
        pytest.skip("fewer than two paired seeds of BYOL + SRIP")
    text = " ".join((REPO / "README.md").read_text().split())
    number = r"([+-]?\d\.\d{3})"
    found = re.search(rf"BYOL \+ SRIP \(gamma 1e-3, chosen the same way\) against BYOL on (\w+) fresh seeds (?:so far )?changes "
                      rf"test kNN top-1 by {number} \(95% CI {number} to {number}\)", text)
    assert found, "the README's SRIP sentence is missing or reworded"
    comparison = next(c for c in rows["comparison"] if c.startswith("BYOL / CIFAR-10 / SRIP"))
    verdicts = {claim: table.loc[[claim]].set_index("comparison").loc[comparison] for claim in
                ("accuracy_knn", "accuracy_srip", "orthogonality", "weights", "hidden", "representation")}
    knn = verdicts["accuracy_knn"]
    assert found.group(1) == {2: "two", 3: "three", 4: "four", 5: "five"}[knn["seeds"]]
    assert [float(v) for v in found.groups()[1:]] == pytest.approx([knn["effect"], knn["ci_low"], knn["ci_high"]], abs=5.1e-4)
    said = "leaves the weights closer to orthogonal and their spectra flatter beyond the seeds' spread" in text
    holds = (verdicts["orthogonality"]["verdict"] == verdicts["weights"]["verdict"] == "supported"
             and all(verdicts[c]["verdict"] == "no detectable effect" for c in ("accuracy_knn", "accuracy_srip", "hidden",
                                                                             "representation")))
    assert said == holds, {c: v["verdict"] for c, v in verdicts.items()}
