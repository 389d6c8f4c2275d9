"""``test.py --compare`` / :mod:`utils.compare`: the paper-style table of several runs against a reference.

Fake run directories with hand-chosen numbers check the statistics, the paired Wilcoxon test, the matching
by image name, the refusals, bytes and time per round and that the three outputs agree; one end-to-end test
trains two tiny runs (hssf, local) and compares them through ``test.py``'s main function.
"""
import csv
import importlib.util
import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import wilcoxon

from utils.compare import (AVG, CompareError, compare, csv_rows, format_latex, format_markdown, human_bytes,
                           load_run, write_outputs)

ROOT = Path(__file__).resolve().parent.parent


def _test_py():
    spec = importlib.util.spec_from_file_location("_compare_test_py", ROOT / "test.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_run(root: Path, folder: str, method: str, images, rounds=None, sites=("A", "B"), shuffle=False,
             seed=0) -> Path:
    """A run directory as train.py leaves it (only the files the comparison reads).

    ``images``: [(group, name, dice, hd95 or None)]; ``rounds``: [(bytes dict, time_s)]."""
    run = root / folder
    (run / "test").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"name": folder, "method": method,
                                                     "data": {"clients": list(sites)}}))
    (run / "results.json").write_text(json.dumps({"name": folder, "method": method, "rounds": 2}))
    rounds = rounds or [({"client0": {"up": 10, "down": 20}, "client1": {"up": 10, "down": 20}}, 1.0)]
    (run / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "bytes": b, "time_s": t}) + "\n"
                                               for r, (b, t) in enumerate(rounds)))
    rows = list(images)
    if shuffle:
        random.Random(seed).shuffle(rows)
    with open(run / "test" / "per_image.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "name", "dice", "iou", "precision", "recall", "hd95"])
        for g, n, d, h in rows:
            w.writerow([g, n, f"{d:.4f}", f"{d / 2:.4f}", "50.0000", "50.0000", "" if h is None else f"{h:.4f}"])
    return run


# reference: client0 Dice 10, 20, 30 (HD95 1, -, 3); client1 Dice 40, 50 (HD95 5, 7)
REF = [("client0", "A/a.png", 10.0, 1.0), ("client0", "A/b.png", 20.0, None), ("client0", "A/c.png", 30.0, 3.0),
       ("client1", "B/a.png", 40.0, 5.0), ("client1", "B/b.png", 50.0, 7.0)]


def _row(result, label):
    return next(r for r in result["rows"] if r["label"] == label)


def test_mean_and_std_per_client_and_pooled(tmp_path):
    ref = make_run(tmp_path, "hssf", "hssf", REF)
    res = compare([], ref)
    s = _row(res, "hssf")["stats"]
    assert res["columns"] == ["client0", "client1", AVG] and res["images"] == {"client0": 3, "client1": 2, AVG: 5}
    assert res["sites"] == {"client0": "A", "client1": "B", AVG: AVG}
    # sample std (ddof 1), by hand
    assert s["dice"]["client0"]["mean"] == pytest.approx(20) and s["dice"]["client0"]["std"] == pytest.approx(10)
    assert s["dice"]["client1"]["mean"] == pytest.approx(45) and s["dice"]["client1"]["std"] == pytest.approx(50 ** .5)
    # avg pools the 5 images (mean 30), it is not the mean of the client means (32.5)
    assert s["dice"][AVG]["mean"] == pytest.approx(30) and s["dice"][AVG]["std"] == pytest.approx(250 ** .5)
    assert s["dice"][AVG]["n"] == 5
    # HD95 only where defined, the undefined one counted
    assert s["hd95"]["client0"] == pytest.approx({"mean": 2.0, "std": 2 ** .5, "n": 2, "left_out": 1})
    assert s["hd95"][AVG] == pytest.approx({"mean": 4.0, "std": (20 / 3) ** .5, "n": 4, "left_out": 1})
    md = format_markdown(res)
    assert "20.00 ± 10.00" in md and "45.00 ± 7.07" in md and "30.00 ± 15.81" in md and "4.00 ± 2.58" in md
    assert "HD95 undefined (left out): hssf 1/5" in md


def test_wilcoxon_by_hand_and_against_scipy(tmp_path):
    # n = 5, every difference positive: the exact two-sided p is 2 * (1/2)^5 = 2/32
    names = [f"img{i}.png" for i in range(5)]
    ref = make_run(tmp_path, "hssf", "hssf", [("client0", n, 50.0, 10.0) for n in names], sites=("A",))
    up = make_run(tmp_path, "up", "local", [("client0", n, 50.0 + d, 10.0 + d) for n, d in zip(names, [1, 2, 3, 4, 5])],
                  sites=("A",))
    t = _row(compare([up], ref), "local")["tests"]
    assert t["dice"][AVG] == {"p": pytest.approx(2 / 32), "n": 5}
    assert t["hd95"]["client0"]["p"] == pytest.approx(0.0625)

    # a larger case against scipy called by hand on the same pairs; HD95 pairs only where both are defined
    rng = np.random.default_rng(0)
    imgs_ref, imgs_b, pairs = [], [], {"dice": ([], []), "hd95": ([], []), "dice0": ([], [])}
    for k in range(2):
        for i in range(15):
            d_ref, d_b = float(rng.uniform(0, 100)), float(rng.uniform(0, 100))
            h_ref = None if i % 5 == 0 else float(rng.uniform(1, 50))
            h_b = None if i % 4 == 1 else float(rng.uniform(1, 50))
            d_ref, d_b = round(d_ref, 4), round(d_b, 4)
            h_ref = None if h_ref is None else round(h_ref, 4)
            h_b = None if h_b is None else round(h_b, 4)
            imgs_ref.append((f"client{k}", f"s{k}/{i}.png", d_ref, h_ref))
            imgs_b.append((f"client{k}", f"s{k}/{i}.png", d_b, h_b))
            pairs["dice"][0].append(d_b), pairs["dice"][1].append(d_ref)
            if k == 0:
                pairs["dice0"][0].append(d_b), pairs["dice0"][1].append(d_ref)
            if h_ref is not None and h_b is not None:
                pairs["hd95"][0].append(h_b), pairs["hd95"][1].append(h_ref)
    ref2 = make_run(tmp_path / "2", "hssf", "hssf", imgs_ref)
    b2 = make_run(tmp_path / "2", "b", "local", imgs_b)
    t = _row(compare([b2], ref2), "local")["tests"]
    assert t["dice"][AVG]["p"] == pytest.approx(wilcoxon(*pairs["dice"], alternative="two-sided").pvalue)
    assert t["dice"]["client0"]["p"] == pytest.approx(wilcoxon(*pairs["dice0"]).pvalue)
    assert t["hd95"][AVG]["n"] == len(pairs["hd95"][0]) < 30
    assert t["hd95"][AVG]["p"] == pytest.approx(wilcoxon(*pairs["hd95"]).pvalue)


def test_images_are_matched_by_name_not_by_row_order(tmp_path):
    b_imgs = [(g, n, d + delta, None if h is None else h + delta)
              for (g, n, d, h), delta in zip(REF, [5.0, -1.0, 2.5, 7.0, 3.0])]
    ref = make_run(tmp_path, "hssf", "hssf", REF)
    ordered = make_run(tmp_path, "b", "local", b_imgs)
    shuffled = make_run(tmp_path, "b_shuffled", "local", b_imgs, shuffle=True, seed=3)
    ref_shuffled = make_run(tmp_path, "hssf_shuffled", "hssf", REF, shuffle=True, seed=5)
    assert [l.split(",")[1] for l in (shuffled / "test/per_image.csv").read_text().splitlines()[1:]] != \
           [n for _, n, _, _ in b_imgs]
    a = _row(compare([ordered], ref), "local")
    b = _row(compare([shuffled], ref_shuffled), "local")
    assert a["stats"] == b["stats"] and a["tests"] == b["tests"]
    assert a["tests"]["dice"][AVG]["p"] == pytest.approx(wilcoxon([5.0, -1.0, 2.5, 7.0, 3.0], [0] * 5).pvalue)


def test_different_test_images_are_refused(tmp_path):
    ref = make_run(tmp_path, "hssf", "hssf", REF)
    fewer = make_run(tmp_path, "fewer", "local", REF[:-1])
    renamed = make_run(tmp_path, "renamed", "lssl", REF[:-1] + [("client1", "B/other.png", 1.0, 1.0)])
    moved = make_run(tmp_path, "moved", "fedavg", REF[:-1] + [("client0", "B/b.png", 1.0, 1.0)])
    with pytest.raises(CompareError, match=r"fewer and the reference .*hssf were tested on different images "
                                           r"\(4 vs 5, 4 in common\).*only in the reference: client1:B/b.png"):
        compare([fewer], ref)
    with pytest.raises(CompareError, match=r"only in .*renamed: client1:B/other.png"):
        compare([renamed], ref)
    with pytest.raises(CompareError, match=r"only in .*moved: client0:B/b.png"):  # same name, other client
        compare([moved], ref)
    dup = make_run(tmp_path, "dup", "local", REF + [REF[0]])
    with pytest.raises(CompareError, match=r"dup.*per_image.csv, line 7: image 'A/a.png' of client0 is listed twice"):
        compare([dup], ref)


def test_missing_files_are_named(tmp_path):
    ref = make_run(tmp_path, "hssf", "hssf", REF)
    b = make_run(tmp_path, "b", "local", REF)
    (b / "test" / "per_image.csv").unlink()
    with pytest.raises(CompareError, match=r"b: no test/per_image.csv: it holds only summaries \(results.json\)"):
        compare([b], ref)
    c = make_run(tmp_path, "c", "local", REF)
    (c / "metrics.jsonl").unlink()
    with pytest.raises(CompareError, match=r"c: no metrics.jsonl"):
        compare([c], ref)
    d = make_run(tmp_path, "d", "local", REF)
    (d / "results.json").unlink(), (d / "config.yaml").unlink()
    with pytest.raises(CompareError, match=r"d: neither results.json nor config.yaml"):
        compare([d], ref)
    with pytest.raises(CompareError, match=r"nothere: no such run directory"):
        compare([tmp_path / "nothere"], ref)
    with pytest.raises(CompareError, match="unknown metric"):
        compare([], ref, ["dice", "f1"])


def test_a_committed_log_without_per_image_rows_is_refused_by_name():
    logs = ROOT / "logs" / "mixed_lite"  # committed before per-image scores were kept in logs/
    assert logs.is_dir() and not (logs / "test" / "per_image.csv").exists()
    with pytest.raises(CompareError, match=r"mixed_lite: no test/per_image.csv: it holds only summaries "
                                           r"\(test_table.txt, results.json\).*train the run again"):
        load_run(logs)


def test_the_committed_comparison_table_is_made_from_the_committed_logs():
    """docs/results.md "Comparison on the lite federation": the same numbers again from logs/compare_lite; the
    run with the exact exchange reductions equals HSSF on every test image (p = 1)."""
    import csv

    logs = ROOT / "logs" / "compare_lite"
    committed = list(csv.DictReader(open(logs / "table" / "compare.csv")))
    runs = [logs / r["run"].split("/")[-1] for r in committed if r["reference"] == "0"]
    result = compare(runs, logs / "hssf")
    header, rows = csv_rows(result)
    assert len(rows) == len(committed) == 14
    for got, want in zip(rows, committed):
        assert got["method"] == want["method"]
        for k in ("dice_avg_mean", "hd95_avg_mean", "p_dice_avg", "bytes_per_round"):
            assert (str(got[k]) == want[k]) or float(got[k]) == pytest.approx(float(want[k]), rel=1e-12), (got["label"], k)
    exact = _row(result, "hssf (hssf_exact)")
    assert exact["tests"]["dice"]["avg"]["p"] == 1.0
    assert exact["stats"]["dice"]["avg"] == _row(result, "hssf (hssf)")["stats"]["dice"]["avg"]


def test_bytes_and_time_per_round(tmp_path):
    rounds = [({"client0": {"up": 1000, "down": 3000, "wire_up": 10 ** 9}, "client1": {"up": 500, "down": 500}}, 2.0),
              ({"client0": {"up": 2000, "down": 1000}, "client1": {"up": 500, "down": 1500}}, 4.5),
              ({"client0": {"up": 0, "down": 0}, "client1": {"up": 0, "down": 0}}, 3.5)]
    ref = make_run(tmp_path, "hssf", "hssf", REF, rounds=rounds)
    r = load_run(ref)
    assert r.rounds == 3 and r.up == pytest.approx(4000 / 3) and r.down == pytest.approx(6000 / 3)
    assert r.bytes == pytest.approx(10000 / 3) and r.time_s == pytest.approx(10 / 3)
    row = _row(compare([], ref), "hssf")
    assert row["bytes"] == pytest.approx(10000 / 3) and row["time_s"] == pytest.approx(10 / 3)
    md = format_markdown(compare([], ref))
    assert "3.26 KiB" in md and "3.3 s" in md
    assert [human_bytes(x) for x in (0, 1023, 1024, 5 * 2 ** 20 + 2 ** 19, 3 * 2 ** 30)] == \
           ["0 B", "1023 B", "1.00 KiB", "5.50 MiB", "3.00 GiB"]


def _md_rows(md: str):
    """The first Markdown table as {label: {header: cell}}."""
    lines = [l for l in md.splitlines() if l.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for l in lines[2:]:
        if not l.startswith("| ") or l.startswith("|-"):
            break
        cells = [c.strip() for c in l.strip("|").split("|")]
        if len(cells) != len(head):
            break
        rows[cells[0]] = dict(zip(head, cells))
    return rows


def test_markdown_latex_and_csv_agree(tmp_path):
    rng = np.random.default_rng(1)
    imgs = {}
    for m in ("hssf", "local", "lssl"):
        imgs[m] = [(f"client{k}", f"s{k}/{i}.png", round(float(rng.uniform(0, 100)), 4),
                    None if rng.uniform() < 0.2 else round(float(rng.uniform(1, 60)), 4))
                   for k in range(3) for i in range(8)]
    rounds = {"hssf": [({"client0": {"up": 3 * 2 ** 20, "down": 2 ** 20}}, 50.0)] * 2,
              "local": [({"client0": {"up": 0, "down": 0}}, 20.0)] * 2,
              "lssl": [({"client0": {"up": 2 ** 30, "down": 2 ** 30}}, 700.0)] * 2}
    runs = {m: make_run(tmp_path, f"run_{m}", m, imgs[m], rounds[m], sites=("X", "Y_1", "Z"), shuffle=m == "lssl")
            for m in imgs}
    res = compare([runs["local"], runs["lssl"]], runs["hssf"])
    assert [r["label"] for r in res["rows"]] == ["local", "lssl", "hssf"]
    paths = write_outputs(res, tmp_path / "out")
    md, tex = paths["md"].read_text(), paths["tex"].read_text()
    assert md == format_markdown(res) and tex == format_latex(res)
    with open(paths["csv"]) as f:
        table = {r["label"]: r for r in csv.DictReader(f)}
    assert list(table) == ["local", "lssl", "hssf"]
    rows = _md_rows(md)
    tex_rows = {l.split(" & ")[0]: l.rstrip(" \\").split(" & ") for l in tex.splitlines()
                if l.split(" & ")[0] in ("local", "lssl", "hssf")}
    assert set(rows) == set(tex_rows) == set(table)
    ncols = len(re.search(r"\\begin\{tabular\}\{(\w+)\}", tex).group(1))
    body = tex.split("\\toprule")[1].split("\\bottomrule")[0]
    span = lambda cell: int(re.match(r"\\multicolumn\{(\d+)\}", cell).group(1)) if "multicolumn" in cell else 1
    assert ncols == 1 + 2 * 5 + 2 and all(sum(span(c) for c in l.split(" & ")) == ncols
                                          for l in body.splitlines() if " & " in l)
    assert tex.count("{") == tex.count("}") and "\\midrule" in body
    for label, c in table.items():
        md_row, tex_row = rows[label], tex_rows[label]
        i = 1
        for m, name in (("dice", "Dice"), ("hd95", "HD95")):
            for j, col in enumerate(["client0", "client1", "client2", AVG]):
                mean, std = float(c[f"{m}_{col}_mean"]), float(c[f"{m}_{col}_std"])
                head = f"{name} avg" if col == AVG else f"{name} c{j + 1} ({['X', 'Y_1', 'Z'][j]})"
                assert md_row[head] == f"{mean:.2f} ± {std:.2f}"
                assert tex_row[i] == f"{mean:.2f} \\tiny $\\pm$ {std:.2f}"
                i += 1
            p = c[f"p_{m}_avg"]
            if label == "hssf":
                assert p == "" and md_row[f"p {name} avg"] == "–" and tex_row[i] == "--"
            else:
                p = float(p)
                assert md_row[f"p {name} avg"] == (f"{p:.3f}" if p >= 1e-3 else f"{p:.2e}")
                assert re.sub(r"[$\\{}]|times10\^", "", tex_row[i]) in (f"{p:.3f}", f"{p:.2e}".replace("e-0", "-")
                                                                         .replace("e-", "-"))
            i += 1
        assert md_row["bytes/round"] == human_bytes(float(c["bytes_per_round"])) == tex_row[i]
        assert md_row["time/round"] == tex_row[i + 1]
    assert rows["hssf"]["bytes/round"] == "4.00 MiB" and rows["lssl"]["bytes/round"] == "2.00 GiB"
    assert rows["lssl"]["time/round"] == "11.7 min" and rows["local"]["time/round"] == "20.0 s"
    assert "Y\\_1" in tex and "run\\_lssl" not in tex.split("\\midrule")[1]
    # the per-column p-values of the second Markdown table are the CSV's
    for label in ("local", "lssl"):
        line = next(l for l in md.split("Paired tests per column")[1].splitlines() if l.startswith(f"| {label} "))
        cells = [x.strip() for x in line.strip("|").split("|")][1:]
        expect = [f"{float(table[label][f'p_{m}_{col}']):.3f} ({table[label][f'pairs_{m}_{col}']})"
                  for m in ("dice", "hd95") for col in ("client0", "client1", "client2", AVG)]
        assert [re.sub(r"^(\d\.\d+e-\d+)", lambda x: f"{float(x.group(1)):.3f}", c) for c in cells] == expect
    fields, _ = csv_rows(res)
    assert "p_hd95_client2" in fields and "hd95_avg_left_out" in fields
    assert "Wilcoxon signed-rank" in md and "Wilcoxon signed-rank" in tex and "reference hssf" in md


def test_repeated_methods_get_the_run_folder(tmp_path):
    ref = make_run(tmp_path, "hssf", "hssf", REF)
    fp16 = make_run(tmp_path, "hssf_fp16", "hssf", REF)
    res = compare([fp16, ref], ref)  # the reference listed among the runs: one row, in its place
    assert [r["label"] for r in res["rows"]] == ["hssf (hssf_fp16)", "hssf (hssf)"]
    # identical per-image scores: nothing tells them apart
    assert res["rows"][0]["tests"]["dice"][AVG] == {"p": 1.0, "n": 5}


def test_cli_compare_mode(tmp_path, capsys):
    test_py = _test_py()
    ref = make_run(tmp_path / "runs", "hssf", "hssf", REF)
    b = make_run(tmp_path / "runs", "local", "local", [(g, n, d + 1, h) for g, n, d, h in REF])
    assert test_py.main(["--compare", str(b), "--reference", str(ref)]) == 0
    out = capsys.readouterr().out
    assert "| local " in out and "| hssf " in out and "Wilcoxon" in out
    for f in ("compare.md", "compare.tex", "compare.csv"):  # default: beside the reference
        assert (tmp_path / "runs" / "compare" / f).is_file()
    assert test_py.main(["--compare", str(b), "--reference", str(ref), "--out", str(tmp_path / "o"),
                         "--metrics", "dice", "iou"]) == 0
    md = (tmp_path / "o" / "compare.md").read_text()
    assert "IoU avg" in md and "HD95" not in md
    (b / "metrics.jsonl").unlink()
    assert test_py.main(["--compare", str(b), "--reference", str(ref)]) == 2
    assert f"{b}: no metrics.jsonl" in capsys.readouterr().err
    for argv, msg in ((["--compare", str(b)], "--compare needs --reference"),
                      (["--compare", str(b), "--reference", str(ref), "--config", "x.yaml"], "takes no --config"),
                      (["--checkpoints", "ck"], "required: --config"),
                      (["--config", "c", "--checkpoints", "ck", "--reference", str(ref)], "belong to --compare")):
        with pytest.raises(SystemExit) as e:
            test_py.main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_utils_compare_reads_files_only():
    code = ("import sys, utils.compare; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('fed', 'datasets', 'networks', 'torch')); print(bad); sys.exit(bool(bad))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_end_to_end_two_tiny_runs(tmp_path, capsys):
    from conftest import run_tiny

    run_tiny(tmp_path, "hssf", "method=hssf", "train.rounds=2")
    run_tiny(tmp_path, "local", "method=local", "train.rounds=2")
    for name in ("hssf", "local"):
        assert (tmp_path / name / "test" / "per_image.csv").is_file()
        assert json.loads((tmp_path / name / "results.json").read_text())["method"] == name
    capsys.readouterr()
    assert _test_py().main(["--compare", str(tmp_path / "local"), "--reference", str(tmp_path / "hssf")]) == 0
    out = capsys.readouterr().out
    print(out)  # the example table (pytest -s shows it)
    res = compare([tmp_path / "local"], tmp_path / "hssf")
    rows = _md_rows(out)
    assert list(rows) == ["local", "hssf"]
    n = res["images"][AVG]
    assert n == sum(res["images"][c] for c in res["columns"][:-1]) > 0
    assert res["sites"] == {"client0": "A", "client1": "B", AVG: AVG}
    summary = json.loads((tmp_path / "hssf" / "test" / "summary.json").read_text())["summary"]
    assert res["rows"][1]["stats"]["dice"][AVG]["mean"] == pytest.approx(summary["all"]["dice"]["mean"], abs=1e-3)
    assert res["rows"][1]["stats"]["dice"]["client1"]["mean"] == pytest.approx(summary["client1"]["dice"]["mean"],
                                                                                abs=1e-3)
    assert res["rows"][1]["bytes"] > 0 and res["rows"][0]["bytes"] == 0  # local exchanges nothing
    assert res["rows"][0]["tests"]["dice"][AVG]["n"] == n
    assert rows["hssf"]["p Dice avg"] == "–" and re.fullmatch(r"[\d.e-]+", rows["local"]["p Dice avg"])
    assert all((tmp_path / "compare" / f).is_file() for f in ("compare.md", "compare.tex", "compare.csv"))
