"""Official-checkpoint compatibility: state-dict names/shapes and outputs match the fixture.

``tests/compat/reference_outputs_seed7.json`` was made with the official model definitions (see
``tests/compat/README.md``). For each of its seven architectures the project's model must have the same
keys and shapes (the loader may drop only ``utils.checkpoint.IGNORED_PREFIXES``), and, with the
fixture's deterministic weights, the same eval outputs within the README's tolerance.
"""
import functools

import pytest
import torch

import networks
from compat_fixture import fixture_input, fixture_state_dict, load_fixture
from networks import load_weights
from utils.checkpoint import IGNORED_PREFIXES, CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")

FIX = load_fixture()


ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "xception", "mobilenetv2", "vgg"]


def test_fixture_covers_the_official_archs():
    assert sorted(FIX["models"]) == sorted(ARCHS)


@functools.lru_cache(maxsize=1)
def _run(arch):
    """Build ``arch`` once, load the fixture weights, return (own shapes, reference shapes, outputs)."""
    torch.manual_seed(0)
    model = networks.build_model(arch, num_classes=2)
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    ref = FIX["models"][arch]["state_dict"]
    sd = fixture_state_dict(ref, FIX["seed"])
    kept = {k: v for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES)}
    outputs = None
    if set(kept) == set(own):
        model.load_state_dict(kept, strict=True)
        model.eval()
        with torch.no_grad():
            out = model(fixture_input(FIX["seed"]))
        outputs = {k: out[k].double() for k in ("mask", "confidence")}
    return own, ref, outputs


# scope="module": pytest runs both tests of one arch back to back, so each model is built once
@pytest.mark.parametrize("arch", ARCHS, scope="module")
def test_state_dict_keys_and_shapes(arch):
    own, ref, _ = _run(arch)
    ref_kept = {k: v for k, v in ref.items() if not k.startswith(IGNORED_PREFIXES)}
    assert sorted(set(ref_kept) - set(own)) == [], "keys of the official model missing here"
    assert sorted(set(own) - set(ref_kept)) == [], "keys the official model does not have"
    bad = [(k, own[k], ref_kept[k]) for k in own if own[k] != ref_kept[k]]
    assert bad == []
    # only the unused classification layer may be dropped
    assert all(k.startswith(("backbone.fc.", "backbone.last_linear.")) for k in set(ref) - set(own))


@pytest.mark.parametrize("arch", ARCHS, scope="module")
def test_outputs_match_reference(arch):
    _, _, out = _run(arch)
    assert out is not None, "state dict does not match; see test_state_dict_keys_and_shapes"
    ref = FIX["models"][arch]
    for name, index_key in (("mask", "mask_index"), ("confidence", "confidence_index")):
        y = out[name]
        assert list(y.shape) == ref[f"{name}_shape"]
        expected = torch.tensor(ref[f"{name}_at_index"], dtype=torch.float64)
        got = y.flatten()[torch.tensor(FIX[index_key])]
        tol = 1e-4 * max(1.0, expected.abs().max().item())
        dev = (got - expected).abs().max().item()
        assert dev <= tol, f"{arch} {name}: max deviation {dev:.3g} > {tol:.3g}"
        for kind, value in ((f"{name}_sum", y.sum().item()), (f"{name}_abs_sum", y.abs().sum().item())):
            assert abs(value - ref[kind]) <= 1e-3 * abs(ref[kind]), f"{arch} {kind}: {value} vs {ref[kind]}"


@pytest.mark.parametrize("arch, extra", [("resnet18", "backbone.fc."), ("xception", "backbone.last_linear.")])
def test_load_weights_accepts_official_checkpoint(tmp_path, arch, extra):
    """An official-style checkpoint (with the unused classifier) loads strictly via load_weights."""
    ref = FIX["models"][arch]["state_dict"]
    assert any(k.startswith(extra) for k in ref)
    sd = fixture_state_dict(ref, seed=123)
    path = tmp_path / f"{arch}_0_best.pth"
    torch.save(sd, path)
    model = networks.build_model(arch)
    load_weights(model, path, arch)
    own = model.state_dict()
    for k, v in sd.items():
        if k.startswith(extra):
            assert k not in own
        else:
            assert torch.equal(own[k], v), k
    # a wrapped/DataParallel-style file loads too
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    load_weights(networks.build_model(arch), path, arch)


def test_load_weights_rejects_another_arch(tmp_path):
    sd = fixture_state_dict(FIX["models"]["resnet34"]["state_dict"], FIX["seed"])
    path = tmp_path / "resnet34_0_best.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="resnet18"):
        load_weights(networks.build_model("resnet18"), path, "resnet18")
