"""Safe checkpoint loading and atomic writes."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import networks
from networks import guess_arch, load_weights
from utils.checkpoint import CheckpointError, safe_load, save_weights
from utils.io import BackgroundWriter, atomic_torch_save, atomic_write_text

ROOT = Path(__file__).resolve().parent.parent


class _Payload:
    """Unpickling this object would create a marker file (code execution)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_crafted_pickle_is_refused_and_its_code_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "resnet18_0_best.pth"
    torch.save({"backbone.conv1.weight": torch.zeros(1), "x": _Payload(marker)}, bad)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused to load.*weights_only=True"):
        load_weights(networks.build_model("tiny"), bad)
    assert not marker.exists()


def test_test_py_refuses_a_malicious_checkpoint(tmp_path):
    marker = tmp_path / "pwned"
    ck = tmp_path / "ck"
    ck.mkdir()
    torch.save({"x": _Payload(marker)}, ck / "tiny_0_best.pth")
    torch.save({"x": _Payload(marker)}, ck / "tiny_1_best.pth")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{root: {tmp_path / 'data'}, dataset: syn, public: P, clients: [A, B], size: 32,"
                   f" synthetic: {{public: 4, per_client: 6}}}}\nmodels: {{server: tiny, clients: [tiny, tiny]}}\n")
    p = subprocess.run([sys.executable, "test.py", "--config", str(cfg), "--checkpoints", str(ck), "--out",
                        str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "refused to load" in p.stderr and "Traceback" not in p.stderr
    assert not marker.exists()


def test_wrong_architecture_names_both_and_the_keys(tmp_path):
    f = tmp_path / "w.pth"
    save_weights(networks.build_model("tiny"), f)
    with pytest.raises(CheckpointError) as e:
        load_weights(networks.build_model("resnet18"), f, "resnet18")
    msg = str(e.value)
    assert "do not fit architecture 'resnet18'" in msg and "look like 'tiny'" in msg
    assert "missing key(s), first: backbone.conv1.weight" in msg and "unexpected key(s), first: backbone.stem" in msg


def test_guess_arch_tells_resnet18_from_resnet34():
    with torch.device("meta"):
        sd = networks.build_model("resnet34").state_dict()
    assert guess_arch(sd, ["resnet18", "resnet34", "resnet50"])[0] == "resnet34"


def test_truncated_file_gives_a_clear_error(tmp_path):
    f = tmp_path / "w.pth"
    save_weights(networks.build_model("tiny"), f)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        safe_load(f)
    with pytest.raises(CheckpointError, match="not found"):
        safe_load(tmp_path / "nope.pth")


def test_official_style_files_load(tmp_path):
    m = networks.build_model("resnet18")
    sd = dict(m.state_dict())
    sd["backbone.fc.weight"] = torch.zeros(1000, 512)  # the official files carry the unused fc layer
    sd["backbone.fc.bias"] = torch.zeros(1000)
    torch.save(sd, tmp_path / "official.pth")
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "dataparallel.pth")
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pth")
    for name in ("official.pth", "dataparallel.pth", "wrapped.pth"):
        fresh = networks.build_model("resnet18")
        load_weights(fresh, tmp_path / name)
        assert torch.equal(fresh.state_dict()["classifier.classifier.3.weight"], sd["classifier.classifier.3.weight"])


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    f = tmp_path / "state.pt"
    atomic_torch_save({"round": 1}, f)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle (injected)")

    with pytest.raises(RuntimeError, match="injected"):
        atomic_torch_save({"round": 2, "x": Unpicklable()}, f)
    assert torch.load(f, weights_only=True) == {"round": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary file left
    atomic_write_text(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").read_text() == "{}"


def test_background_writer_snapshots_and_reports_errors(tmp_path):
    w = BackgroundWriter()
    t = torch.zeros(3)
    w.save({"t": t}, tmp_path / "a.pt")
    t += 1  # changed after submission: the file holds the snapshot
    w.wait()
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["t"], torch.zeros(3))
    (tmp_path / "blocker").write_text("a file where a folder should be")
    w.save({"t": t}, tmp_path / "blocker" / "b.pt")
    with pytest.raises(RuntimeError, match="writing a checkpoint failed"):
        w.wait()
