"""utils/timeline.py: the events of a deployment's processes lined up per message."""
from utils import timeline


def test_events_are_written_only_when_asked_and_lined_up_per_step(tmp_path, monkeypatch):
    path = tmp_path / "t.jsonl"
    monkeypatch.delenv(timeline.ENV, raising=False)
    timeline.mark(who="server")
    assert not path.exists()
    monkeypatch.setenv(timeline.ENV, str(path))
    # two sites answer "fuse" sent at t=10: site A works 10.5-11.5, site B 10.2-12.0; replies at 12.1 and 12.4
    events = [dict(who="server", step="fuse", site="a", round=1, sent=10.0, got=12.1),
              dict(who="server", step="fuse", site="b", round=1, sent=10.0, got=12.4),
              dict(who="warm", took=10.1, pulled=10.5, answered=11.5, pushed=11.6),
              dict(who="warm", took=10.1, pulled=10.2, answered=12.0, pushed=12.1),
              dict(who="site", step="fuse", start=10.5, end=11.5),
              dict(who="site", step="fuse", start=10.2, end=12.0),
              # a second "fuse" message at t=20, one site, and a step of another message
              dict(who="server", step="fuse", site="a", round=1, sent=20.0, got=21.0),
              dict(who="site", step="fuse", start=20.1, end=20.6),
              dict(who="warm", took=20.05, answered=20.6, pushed=20.7),  # no "pulled": its pull failed
              dict(who="server", step="end_round", site="a", round=1, sent=30.0, got=30.3)]
    for e in events:
        timeline.mark(**e)
    got = timeline.summary(timeline.read(path))
    assert list(got) == ["fuse", "end_round"]
    fuse = got["fuse"]
    assert fuse["n"] == 2
    assert abs(fuse["rtt"] - (2.4 + 1.0) / 2) < 1e-9
    assert abs(fuse["work"] - (1.8 + 0.5) / 2) < 1e-9
    assert abs(fuse["pull"] - (0.4 + 0.0) / 2) < 1e-9
    assert abs(fuse["rest"] - ((2.4 - 1.8) + (1.0 - 0.5)) / 2) < 1e-9
    assert got["end_round"] == {"n": 1, "rtt": 0.3, "work": 0.0, "pull": 0.0, "rest": 0.3}
