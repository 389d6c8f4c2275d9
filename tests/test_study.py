"""``python -m bench.study``: the study file, its cells, seed aggregation and a whole tiny study that is
stopped and continued; the study federation builder (on ../shared when present)."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, tiny_overrides

from bench import study as S
from utils.compare import Run, SeedRow, compare_seeds, format_seed_markdown, holm, merge_seeds, pooled, seed_stats


def _run(path, images, method="m", up=None, time_s=None):
    r = Run(path=Path(path), name=str(path), method=method, sites=["A", "B"], images=images, rounds=2,
            up=up, down=up, time_s=time_s)
    r.groups = sorted({g for g, _ in images})
    return r


def _imgs(dice, hd=None):
    hd = hd or [1.0] * len(dice)
    return {(f"client{i % 2}", f"x{i}"): {"dice": d, "hd95": h} for i, (d, h) in enumerate(zip(dice, hd))}


def test_merge_seeds_averages_each_image_and_hd95_where_defined():
    a = _run("a", _imgs([10, 20, 30, 40], [2.0, None, 4.0, None]), up=100, time_s=1.0)
    b = _run("b", _imgs([30, 40, 50, 60], [4.0, 6.0, None, None]), up=300, time_s=3.0)
    m = merge_seeds([a, b], "row")
    assert [m.images[("client0", "x0")]["dice"], m.images[("client1", "x1")]["dice"]] == [20.0, 30.0]
    assert m.images[("client0", "x0")]["hd95"] == 3.0       # both defined
    assert m.images[("client1", "x1")]["hd95"] == 6.0       # only b defines it
    assert m.images[("client0", "x2")]["hd95"] == 4.0       # only a
    assert m.images[("client1", "x3")]["hd95"] is None      # neither
    assert (m.up, m.time_s) == (200.0, 2.0)
    c = _run("c", {("client0", "other"): {"dice": 1.0, "hd95": 1.0}})
    with pytest.raises(Exception, match="different images"):
        merge_seeds([a, c], "row")


def test_seed_stats_are_mean_and_std_over_seeds_of_pooled_scores():
    a = _run("a", _imgs([10, 20, 30, 40]))   # pooled 25; client0 (x0, x2) 20; client1 30
    b = _run("b", _imgs([30, 40, 50, 60]))   # pooled 45; client0 40; client1 50
    row = SeedRow("r", [a, b], [b, b], {"client0": "resnet18", "client1": "resnet34"})
    s = seed_stats(row, ["dice"])
    assert s["seeds"] == 2
    assert s["dice_best_all"]["mean"] == 35.0
    assert math.isclose(s["dice_best_all"]["std"], math.sqrt(200))  # ddof 1 of (25, 45)
    assert s["dice_last_all"] == {"mean": 45.0, "std": 0.0, "n": 2}
    assert s["dice_best_resnet18"]["mean"] == 30.0 and s["dice_best_resnet34"]["mean"] == 40.0
    homogeneous = seed_stats(SeedRow("h", [a], [a], {"client0": "resnet18", "client1": "resnet18"}), ["dice"])
    assert homogeneous["dice_best_resnet18"]["mean"] == 25.0 and "dice_best_resnet34" not in homogeneous
    assert pooled(a, "dice", ["client1"]) == 30.0


def test_compare_seeds_tests_the_seed_averaged_images_against_the_reference():
    ref = [_run("ref/s0", _imgs([50 + i for i in range(10)])), _run("ref/s1", _imgs([52 + i for i in range(10)]))]
    low = [_run("low/s0", _imgs([10 + i for i in range(10)])), _run("low/s1", _imgs([12 + i for i in range(10)]))]
    same = [_run("same/s0", _imgs([51 + i for i in range(10)]))]  # one seed equal to the reference's mean
    rows = [SeedRow("ref", ref, ref, {}), SeedRow("low", low, low, {}), SeedRow("same", same, same, {})]
    res = compare_seeds(rows, "ref", ["dice"])
    by = {r["label"]: r for r in res["rows"]}
    assert by["ref"]["reference"] and by["ref"]["seeds"]["dice_best_all"]["mean"] == 55.5
    assert by["low"]["tests"]["dice"]["avg"]["p"] == pytest.approx(2 / 2**10)  # all 10 lower: exact p
    assert by["same"]["tests"]["dice"]["avg"]["p"] == 1.0  # identical per-image means
    # Holm over the two rows tested: 2/1024 * 2 for the smaller, then max(that, 1.0 * 1) for the larger
    assert by["low"]["tests"]["dice"]["avg"]["p_holm"] == pytest.approx(4 / 2**10)
    assert by["same"]["tests"]["dice"]["avg"]["p_holm"] == 1.0
    md = format_seed_markdown(res)
    low_line = next(ln for ln in md.splitlines() if ln.startswith("| low "))
    same_line = next(ln for ln in md.splitlines() if ln.startswith("| same "))
    assert "0.002 *" in low_line and "*" not in same_line  # low stays significant after Holm, same does not
    assert "Holm's correction for the 2 rows" in md
    with pytest.raises(Exception, match="reference row 'nope'"):
        compare_seeds(rows, "nope", ["dice"])
    with pytest.raises(Exception, match="folders of their own"):
        compare_seeds(rows + [SeedRow("again", ref, ref, {})], "ref", ["dice"])


def test_holm_adjustment_by_hand_and_its_family_wise_error():
    # m = 4: sorted 0.01, 0.02, 0.03, 0.5 -> 0.04, 0.06, 0.06 (monotone: max(0.06, 0.03 * 2)), 0.5; None kept
    assert holm([0.03, None, 0.01, 0.5, 0.02]) == pytest.approx([0.06, None, 0.04, 0.5, 0.06])
    assert holm([0.9, 0.8]) == [1.0, 1.0] and holm([0.9, 0.3]) == [0.9, 0.6] and holm([]) == [] and holm([None]) == [None]
    # 20 true null hypotheses (uniform p): uncorrected, some p < 0.05 in about 1 - 0.95^20 = 64 % of the
    # families; after Holm in at most 5 % (binomial bounds over 4000 families)
    rng = np.random.default_rng(0)
    fams = rng.uniform(size=(4000, 20))
    raw = np.mean([(f < 0.05).any() for f in fams])
    adj = np.mean([(np.array(holm(list(f))) < 0.05).any() for f in fams])
    assert 0.60 < raw < 0.68 and adj < 0.05 + 3 * math.sqrt(0.05 * 0.95 / 4000)


def test_pairs_are_tested_on_the_seeds_both_rows_have(tmp_path):
    """``pairs``: B against A on their common seeds only (A's third seed left out of both the means and the
    per-image averages); a pair with a row not finished yet is left out; a bad pair is refused."""
    a = [_run(f"a/s{k}", _imgs([50 + k + i for i in range(10)], [5.0] * 10)) for k in range(3)]
    b = [_run(f"b/s{k}", _imgs([40 + k + i for i in range(10)], [6.0] * 10)) for k in range(2)]
    rows = {"a": SeedRow("a", a, a, {}), "b": SeedRow("b", b, b, {})}
    lines = S.pair_section(rows, [["a", "b"], ["a", "missing"]])
    body = [line for line in lines if line.startswith("| b vs a")]
    assert len(body) == 1 and len([line for line in lines if line.startswith("| ")]) == 2  # head + one pair
    cells = [c.strip() for c in body[0].strip("|").split("|")]
    # on s0 and s1: a pools 54.5 and 55.5, b 44.5 and 45.5; every image 10 lower: exact p = 2 / 2**10
    assert cells[:6] == ["b vs a", "s0, s1", "55.00 ± 0.71", "45.00 ± 0.71", "-10.00", "0.002"]
    assert cells[6:9] == ["5.00 ± 0.00", "6.00 ± 0.00", "+1.00"]
    assert S.pair_section(rows, [["a", "missing"]]) == []
    study = {"name": "t", "base": "b.yaml", "rows": {"a": {}, "b": {}}}
    for bad, msg in (([["a", "c"]], "'c' is not a row"), ([["a", "a"]], "with itself"), ([["a"]], "list of")):
        f = tmp_path / "s.yaml"
        f.write_text(yaml.safe_dump({**study, "pairs": bad}))
        with pytest.raises(S.StudyError, match=msg):
            S.load_study(f)


def _write_study(tmp_path, rows, seeds=(0, 1), **extra):
    base = tmp_path / "base.yaml"
    # the tiny federation of the other tests, as a base config file
    cfg = {}
    for kv in tiny_overrides(tmp_path, "x"):
        k, v = kv.split("=", 1)
        d = cfg
        *parents, leaf = k.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = yaml.safe_load(v)
    base.write_text(yaml.safe_dump(cfg))
    s = {"name": "t", "base": str(base), "seeds": list(seeds), "reference": next(iter(rows)), "rows": rows,
         "runs": str(tmp_path / "runs"), "logs": str(tmp_path / "logs"), **extra}
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(s, sort_keys=False))
    return p


def test_study_file_errors_name_the_key(tmp_path):
    p = _write_study(tmp_path, {"hssf": {"method": "hssf"}})
    s = yaml.safe_load(p.read_text())
    for bad, msg in [({**s, "sedes": [1]}, "unknown key.*sedes"),
                     ({**s, "rows": {"hssf": {"methd": "hssf"}}}, "rows.hssf: unknown key.*methd"),
                     ({**s, "reference": "nope"}, "reference 'nope' is not a row"),
                     ({**s, "rows": {"all_foreground": {}}}, "reserved"),
                     ({k: v for k, v in s.items() if k != "base"}, "missing key 'base'")]:
        p.write_text(yaml.safe_dump(bad))
        with pytest.raises(S.StudyError, match=msg):
            S.load_study(p)
    p.write_text(yaml.safe_dump({**s, "rows": {"hssf": {"set": ["train.roundz=3"]}}}))
    with pytest.raises(S.StudyError, match=r"(?s)rows.hssf \(seed 0\).*train.roundz"):
        S.check_configs(S.load_study(p))


def test_cells_run_in_seed_order_with_their_overrides(tmp_path):
    p = _write_study(tmp_path, {"a": {"method": "hssf"}, "b": {"method": "local", "seeds": [5],
                                                                 "set": ["train.rounds=3"]}},
                     seeds=(0, 1), set=["train.lr=0.001"])
    st = S.load_study(p)
    cs = S.cells(st)
    assert [(c["row"], c["seed"]) for c in cs] == [("a", 0), ("b", 5), ("a", 1)]
    b = cs[1]["overrides"]
    assert b[:3] == ["train.lr=0.001", "train.rounds=3", "method=local"] and "seed=5" in b
    assert b[-1] == f"output.dir={tmp_path / 'runs' / 'b' / 's5'}"
    cfgs = S.check_configs(st)
    assert cfgs[("b", 5)].train.rounds == 3 and cfgs[("b", 5)].train.lr == 0.001 and cfgs[("b", 5)].seed == 5
    assert S.labeled_passes(cfgs[("a", 0)], st["rows"]["a"]) == 2.0  # tiny: 2 fusion passes
    assert S.labeled_passes(cfgs[("b", 5)], st["rows"]["b"]) == 1.0


def test_a_study_stopped_and_continued(tmp_path):
    """Two rows x two seeds of the tiny federation: the first call runs one cell and stops; the second
    skips it and runs the rest; a killed cell (state of round 0 only) continues with --resume and ends
    with the same weights as an uninterrupted run; then the table, CSV, LaTeX and figure."""
    p = _write_study(tmp_path, {"hssf": {"method": "hssf"}, "public_only": {"method": "public_only"}})
    cmd = [sys.executable, "-m", "bench.study", str(p)]
    out = subprocess.run(cmd + ["--max-cells", "1"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "[1/4] hssf s0: done in" in out.stdout and "stopping after 1 cell" in out.stdout
    # a killed cell: public_only s0 trained one round of two, then was stopped
    from fed import load_config
    from fed.core.run import train

    st = S.load_study(p)
    c = S.cells(st)[1]
    cfg = load_config(st["base"], c["overrides"])
    train(cfg, progress=False, stop_after=1)
    assert S.cell_state(c["dir"]) == "resume"
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "[1/4] hssf s0: done before" in out.stdout and "public_only s0: resuming" in out.stdout
    assert "about 0.0 min left for 0 cell(s)" in out.stdout
    logs = tmp_path / "logs"
    for row in ("hssf", "public_only"):
        for s in (0, 1):
            d = logs / row / f"s{s}"
            assert (d / "test" / "per_image.csv").is_file() and (d / "test_last" / "per_image.csv").is_file()
            assert not list(d.rglob("*.pth")), "checkpoints are never copied to the logs"
    for line in (logs / "public_only" / "s1" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)  # public_only: supervised passes on D_p only, nothing exchanged
        assert set(rec["loss"]) == {"client0", "client1"}
        assert all(k.startswith(("sup_", "diag_sa_")) for t in rec["loss"].values() for k in t), rec["loss"]
        assert all(b["up"] == b["down"] == 0 for b in rec["bytes"].values())
    resumed = json.loads((logs / "public_only" / "s0" / "results.json").read_text())
    # the resumed cell equals an uninterrupted run of the same config
    cfg2 = load_config(st["base"], c["overrides"][:-1] + [f"output.dir={tmp_path / 'straight'}"])
    straight = train(cfg2, progress=False)
    assert resumed["test"]["all"]["dice"] == straight["test"]["all"]["dice"]
    assert resumed["best"]["all"] == straight["best"]["all"]
    table = (logs / "table.md").read_text()
    assert "NOT EVIDENCE: the floor does not hold" in table and "all_foreground" in table  # tiny: no learning
    rows = list(csv.DictReader(open(logs / "table.csv")))
    assert [r["label"] for r in rows] == ["hssf", "public_only", "all_foreground"]
    assert rows[0]["seeds"] == "2" and rows[0]["labeled_passes"] == "2.0"
    assert float(rows[2]["dice_avg_mean"]) > 0  # every pixel foreground scores the masks' overlap
    assert (logs / "table.tex").read_text().count("\\\\") >= 4 and (logs / "curves.png").stat().st_size > 0
    again = subprocess.run(cmd + ["--dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert again.stdout.count(" done ") == 4
    # a fresh clone has the committed logs and no runs: its finished cells are not run again ...
    import shutil

    shutil.rmtree(tmp_path / "runs")
    st = S.load_study(p)
    cfgs = S.check_configs(st)
    assert [S.cell_state(c["dir"], c["logged"], cfgs[(c["row"], c["seed"])]) for c in S.cells(st)] == ["logged"] * 4
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("done before (its logs in") == 4 and not (tmp_path / "runs").exists()
    # ... unless the study's config of a cell changed since its logs were written
    y = yaml.safe_load(p.read_text())
    y["rows"]["public_only"]["set"] = ["train.lr=0.0005"]
    p.write_text(yaml.safe_dump(y))
    again = subprocess.run(cmd + ["--dry-run"], cwd=ROOT, capture_output=True, text=True).stdout.splitlines()
    assert [ln.split()[2] for ln in again] == ["logged", "new", "logged", "new"], again


SHARED = ROOT.parent / "shared" / "data" / "polyp"


@pytest.mark.skipif(not (SHARED / "EndoTect").is_dir(), reason="needs ../shared/data (development machine)")
def test_study_federation_builder(tmp_path):
    from datasets.study_federation import build
    from datasets.splits import load_split

    path = build(SHARED, tmp_path, public=20, clients=3, unlabeled=10, val=4, test=6, size=32, progress=False)
    sites = ["Kvasir1", "Kvasir2", "Kvasir3"]
    split = load_split(path, "Public", sites)
    names = [n for s in sites for k in ("unlabeled_train", "val_list", "test_list") for n in split[s][k]]
    assert len(names) == len(set(names)) == 60, "client parts and their lists are disjoint"
    assert len(split["Public"]["labeled_train"]) == 20 and all(not split[s]["labeled_train"] for s in sites)
    from PIL import Image

    m = np.asarray(Image.open(tmp_path / "polyp_study" / "Kvasir1" / "mask" / split["Kvasir1"]["test_list"][0]))
    assert m.shape == (32, 32) and set(np.unique(m)) <= {0, 255}
    again = build(SHARED, tmp_path / "b", public=20, clients=3, unlabeled=10, val=4, test=6, size=32, progress=False)
    assert json.loads(again.read_text()) == json.loads(path.read_text()), "same seed, same federation"
    with pytest.raises(SystemExit, match="already holds files"):
        build(SHARED, tmp_path, public=20, clients=3, unlabeled=10, val=4, test=6, size=32, progress=False)
    with pytest.raises(SystemExit, match="need 3000"):
        build(SHARED, tmp_path / "c", clients=3, unlabeled=900, val=50, test=50, progress=False)
