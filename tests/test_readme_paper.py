"""The quotation of the paper's Tables I and II in docs/results.md ("The paper's numbers, for reference") equals
../shared/SPEC.md section 6 (skipped without it)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT.parent / "shared" / "SPEC.md"
README = ROOT / "docs" / "results.md"  # where the README's results reference moved
NUM = r"\d+(?:\.\d+)?"


def _section(text: str, heading: str) -> str:
    i = text.index(heading)
    nxt = re.search(r"^#{1,3} ", text[i + len(heading):], re.M)
    return text[i:i + len(heading) + (nxt.start() if nxt else len(text))]


def _md_table_after(text: str, marker: str):
    lines = text[text.index(marker):].splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("|"))
    rows = []
    for l in lines[start:]:
        if not l.startswith("|"):
            break
        rows.append([c.strip() for c in l.strip().strip("|").split("|")])
    return rows[0], [r for r in rows[2:]]


def spec_tables():
    """{"I"/"II": {method: {"dice c1".."dice avg", "hd95 c1".."hd95 avg": value}}, plus the client names}."""
    sec = _section(SPEC.read_text(), "## 6.")
    out = {}
    for key, marker in (("I", "Table I, polyp"), ("II", "Table II, ISIC-2018")):
        head, rows = _md_table_after(sec, marker)
        assert head[:3] == ["method", "hetero", "p"] and len(head) == 13, head
        cols = [f"dice c{i}" for i in range(1, 5)] + ["dice avg"] + [f"hd95 c{i}" for i in range(1, 5)] + ["hd95 avg"]
        out[key] = {r[0]: {c: float(v) for c, v in zip(cols, r[3:])} for r in rows}
        names = re.search(re.escape(marker) + r"[^(]*\(c1\.\.c4 = ([^)]*)\)", sec).group(1)
        out[key + " clients"] = [n.strip() for n in names.split(",")]
    return out


def readme_quotes():
    """Every number of docs/results.md's "paper's numbers" section as {table: {method: {column: value}}}, and how
    many numbers the section holds (all must be accounted for)."""
    sec = _section(README.read_text(), "## The paper's numbers")
    spec = spec_tables()
    got = {"I": {}, "II": {}}
    # Table I: a Markdown table, columns named by client (a part of the SPEC's client name), avg, HD95 avg
    head, rows = _md_table_after(sec, "| Table I")
    clients = spec["I clients"]

    def column(h):
        h = h.strip()
        metric = "hd95" if h.lower().startswith("hd95") else "dice"
        h = re.sub(r"^(HD95|Dice)\s*|\s*\(px\)|\s*\(%\)", "", h).strip()
        if h == "avg":
            return f"{metric} avg"
        hits = [i for i, c in enumerate(clients) if h.lower() in c.lower()]
        assert len(hits) == 1, f"README column {h!r} names none or several of {clients}"
        return f"{metric} c{hits[0] + 1}"

    cols = [column(h) for h in head[1:]]
    for r in rows:
        method = re.sub(r"\s*\(.*\)", "", r[0]).strip()
        got["I"][method] = {c: float(v) for c, v in zip(cols, r[1:])}
    # Table II: prose, "Table II (...): HSSF Dice a / b / c / d, avg x, HD95 avg y; LSSL Dice avg z."
    prose = re.search(r"Table II \([^)]*\):(.*?)\.(?:\s|$)", sec, re.S).group(1)
    for clause in prose.split(";"):
        clause = " ".join(clause.split())
        method = clause.split()[0]
        d = got["II"].setdefault(method, {})
        m = re.search(rf"Dice ({NUM}(?:\s*/\s*{NUM})+)", clause)
        if m:
            for i, v in enumerate(m.group(1).split("/")):
                d[f"dice c{i + 1}"] = float(v)
        m = re.search(rf"(?:Dice avg|, avg) ({NUM})", clause)
        if m:
            d["dice avg"] = float(m.group(1))
        m = re.search(rf"HD95 avg ({NUM})", clause)
        if m:
            d["hd95 avg"] = float(m.group(1))
    count = len(re.findall(r"(?<![\w.])\d+\.\d+(?!\d)", sec))
    return got, count


@pytest.mark.skipif(not SPEC.is_file(), reason="../shared/SPEC.md is not here")
def test_readme_quotes_the_paper_tables_as_the_spec():
    spec = spec_tables()
    got, count = readme_quotes()
    assert got["I"] and got["II"]
    assert count == sum(len(v) for t in got.values() for v in t.values()), "numbers in the README section not parsed"
    diffs = [f"Table {t}, {m}, {c}: README {v} != SPEC {spec[t][m][c]}"
             for t in ("I", "II") for m, cols in got[t].items() for c, v in cols.items()
             if m not in spec[t] or spec[t][m][c] != v]
    assert not diffs, "\n".join(diffs)
    # the rows the README quotes: HSSF and LSSL of both tables
    assert set(got["I"]) == set(got["II"]) == {"HSSF", "LSSL"}
