"""Every registered architecture: shapes, feature perturbation, size checks, a training step, save/load.

Parametrised over ``networks.available()`` with ``scope="module"``: pytest runs all tests of one
architecture back to back, and the ``model`` fixture builds it once (small inputs, batch 2).
"""
import copy
import warnings

import pytest
import torch

import networks
from networks.pretrained import PretrainedWeightsNotFound
from networks import load_weights
from utils.checkpoint import save_weights
from utils.losses import confidence_loss, structure_loss

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = networks.available()


CANDIDATE_SIZES = [32, 48, 33, 64, 80, 128, 144]


def _accepts(model, s):
    try:
        model.check_size(s, s)
        return True
    except ValueError:
        return False


def _sizes(model, n=3):
    """Up to ``n`` small accepted sizes, including ones not divisible by 32 where accepted."""
    return [s for s in CANDIDATE_SIZES if _accepts(model, s)][:n]


@pytest.fixture(scope="module")
def model(arch):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = networks.build_model(arch, num_classes=2)
    yield m
    del m


def _batch(size, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, size, size, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    fg = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2).long()
    target = torch.nn.functional.one_hot(fg, 2).permute(2, 0, 1).float().expand(2, -1, -1, -1).contiguous()
    x = x + 2 * fg  # learnable: the foreground is brighter
    return x, target


def test_available_names_are_unique_and_cover_the_families():
    assert len(ARCHS) == len(set(ARCHS))
    for name in ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "xception", "mobilenetv2",
                 "vgg", "pvt", "unet"]:
        assert name in ARCHS
    decoders = {n.split(":")[1].split("/")[0] for n in ARCHS if n.startswith("smp:")}
    assert {"Unet", "UnetPlusPlus", "FPN", "DeepLabV3Plus", "PSPNet", "Linknet", "MAnet", "PAN"} <= decoders


@pytest.mark.parametrize("arch", ARCHS, scope="module")
def test_forward_shapes(arch, model):
    model.eval()
    sizes = _sizes(model)
    assert sizes, f"{arch} accepts none of {CANDIDATE_SIZES}"
    shapes = [(2, s, s) for s in sizes[:2]]
    if len(sizes) > 2:
        shapes.append((1, sizes[1], sizes[2]))  # non-square, one side maybe odd
    with torch.no_grad():
        for b, h, w in shapes:
            out = model(torch.randn(b, 3, h, w))
            assert set(out) == {"mask", "confidence"}
            assert out["mask"].shape == (b, 2, h, w)
            assert out["confidence"].shape == (b, 1, h, w)


@pytest.mark.parametrize("arch", ARCHS, scope="module")
def test_feature_perturbation(arch, model):
    model.eval()
    s = _sizes(model)[0]
    x = torch.randn(2, 3, s, s)
    torch.manual_seed(1)
    with torch.no_grad():
        plain = model(x)
        out = model(x, need_fp=True)
    clean, perturbed = out["mask"]
    assert clean.shape == perturbed.shape == (2, 2, s, s)
    assert out["confidence"].shape == (4, 1, s, s)
    # in eval mode the clean half is the plain forward; the perturbed half differs
    # (tolerance relative to the largest value: untrained deep nets in eval mode reach 1e13)
    for got, want in ((clean, plain["mask"]), (out["confidence"][:2], plain["confidence"])):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * scale)
    assert not torch.allclose(clean, perturbed)
    # every feature map the decoder uses is doubled
    feats = model.backbone(x)
    assert len(feats) >= 2 and all(f.shape[0] == 2 for f in feats.values())


@pytest.mark.parametrize("arch", ARCHS, scope="module")
def test_unaccepted_size_raises(arch, model):
    bad = [model.min_size - 1]
    if model.size_divisor > 1:
        bad.append(model.min_size + model.size_divisor // 2 if model.size_divisor > 2 else model.min_size + 1)
    for s in bad:
        with pytest.raises(ValueError, match="accepts input sizes"):
            model(torch.randn(1, 3, s, s))
    with pytest.raises(ValueError, match=str(model.min_size)):
        model(torch.randn(1, 3, bad[0], model.min_size))


@pytest.mark.parametrize("arch", ARCHS, scope="module")
def test_training_step_lowers_loss(arch, model):
    """A few AdamW steps (the paper's lr 1e-4) on a fixed batch lower a fixed loss, with need_fp."""
    s = _sizes(model)[0]
    x, target = _batch(s)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ref_pred = []  # the SA target uses the first prediction, so that the objective stays fixed

    def loss_fn():
        torch.manual_seed(0)  # the same dropout masks at every evaluation
        out = model(x, need_fp=True)
        clean, perturbed = out["mask"]
        if not ref_pred:
            ref_pred.append(clean.detach())
        return (structure_loss(clean, target) + structure_loss(perturbed, target)
                + confidence_loss(ref_pred[0], out["confidence"][:2], target))

    first = loss_fn()
    assert torch.isfinite(first)
    losses, loss = [], first
    while len(losses) < 3 and (not losses or losses[-1] >= first.item()):  # 1 step, up to 3
        opt.zero_grad()
        loss.backward()
        no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert no_grad == [], f"parameters without a gradient: {no_grad[:5]}"
        opt.step()
        loss = loss_fn()
        losses.append(loss.item())
    assert losses[-1] < first.item(), f"{arch}: {first.item():.4f} -> {losses}"


@pytest.mark.parametrize("arch", ARCHS, scope="module")
def test_save_load_roundtrip(arch, model, tmp_path):
    """save_weights -> load_weights into a copy with scrambled weights gives identical eval outputs."""
    model.eval()
    path = save_weights(model, tmp_path / f"{arch.replace(':', '_').replace('/', '_')}_0_best.pth")
    other = copy.deepcopy(model)
    with torch.no_grad():
        for t in other.state_dict().values():
            t.copy_(torch.rand_like(t.float()).to(t.dtype) + 0.5 if t.is_floating_point() else t + 1)
    load_weights(other, path, arch)
    s = _sizes(model)[0]
    x = torch.randn(1, 3, s, s)
    with torch.no_grad():
        a, b = model(x), other(x)
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["confidence"], b["confidence"])
    saved = torch.load(path, weights_only=True)
    assert saved.keys() == model.state_dict().keys()


# ---------------------------------------------------------------- names and errors

def test_docs_table_lists_every_architecture():
    """docs/architectures.md is regenerated: python -m networks --list --size 384 --markdown > ..."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "architectures.md").read_text()
    missing = [a for a in ARCHS if f"| `{a}` |" not in text]
    assert missing == [], f"regenerate docs/architectures.md; missing: {missing}"


def test_unknown_names_raise_keyerror_listing_valid_ones():
    with pytest.raises(KeyError, match="resnet18"):
        networks.build_model("resnet19")
    with pytest.raises(KeyError, match="Valid decoders: .*UnetPlusPlus"):
        networks.build_model("smp:Unett/resnet34")
    with pytest.raises(KeyError, match="Valid encoders: .*efficientnet-b0"):
        networks.build_model("smp:FPN/resnet35")
    with pytest.raises(KeyError, match="smp:<Decoder>/<encoder>"):
        networks.build_model("smp:FPN")
    with pytest.raises(KeyError, match="timm"):
        networks.build_model("smp:FPN/tu-not_a_timm_model")


def test_smp_names_are_case_insensitive_and_open_ended():
    m = networks.build_model("smp:fpn/resnet18")
    assert m.arch == "smp:fpn/resnet18"
    assert type(m.classifier.decoder).__name__ == "FPNDecoder"


def test_unet_multiple_of_16_message():
    m = networks.build_model("unet")
    with pytest.raises(ValueError, match="multiple of 16"):
        m(torch.randn(1, 3, 40, 40))


# ---------------------------------------------------------------- optional ImageNet weights

def _fake_file_from(backbone, extra):
    g = torch.Generator().manual_seed(5)
    sd = {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
          for k, v in backbone.state_dict().items()}
    sd.update(extra)
    return sd


@pytest.mark.parametrize("arch, fname, extra", [
    ("resnet18", "resnet18-f37072fd.pth", {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}),
    ("mobilenetv2", "mobilenet_v2-b0353104.pth", {"classifier.1.weight": torch.zeros(1000, 1280)}),
    ("xception", "xception-43020ad28.pth", {"fc.weight": torch.zeros(1000, 2048)}),
])
def test_imagenet_weights_from_torch_hub_cache(tmp_path, monkeypatch, arch, fname, extra):
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    with pytest.raises(PretrainedWeightsNotFound) as err:
        networks.build_model(arch, pretrained="imagenet")
    msg = str(err.value)
    assert fname in msg and str(hub / "checkpoints") in msg
    assert isinstance(err.value, FileNotFoundError)

    sd = _fake_file_from(networks.build_model(arch).backbone, extra)
    (hub / "checkpoints").mkdir(parents=True)
    torch.save(sd, hub / "checkpoints" / fname)
    model = networks.build_model(arch, pretrained="imagenet")
    own = model.backbone.state_dict()
    assert all(torch.equal(own[k], sd[k]) for k in own)


def test_pretrained_default_is_scratch_and_bad_values_rejected():
    with pytest.raises(ValueError, match="imagenet"):
        networks.build_model("resnet18", pretrained="coco")
    with pytest.raises(ValueError, match="no ImageNet weights"):
        networks.build_model("unet", pretrained="imagenet")


def _fake_hf_snapshot(cache, repo_id, revision, tensors):
    from safetensors.torch import save_file

    snap = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / revision
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(snap / "model.safetensors"))
    refs = cache / f"models--{repo_id.replace('/', '--')}" / "refs"
    refs.mkdir()
    (refs / "main").write_text(revision)


def test_imagenet_weights_smp_encoder_from_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants
    from segmentation_models_pytorch.encoders import encoders

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PretrainedWeightsNotFound) as err:
        networks.build_model("smp:Unet/resnet18", pretrained="imagenet")
    assert "smp-hub/resnet18.imagenet" in str(err.value) and "model.safetensors" in str(err.value)
    assert str(tmp_path) in str(err.value)

    s = encoders["resnet18"]["pretrained_settings"]["imagenet"]
    sd = _fake_file_from(networks.build_model("smp:Unet/resnet18").backbone.encoder, {})
    _fake_hf_snapshot(tmp_path, s["repo_id"], s["revision"], sd)
    model = networks.build_model("smp:Unet/resnet18", pretrained="imagenet")
    own = model.backbone.encoder.state_dict()
    assert all(torch.equal(own[k], sd[k]) for k in own)


def test_imagenet_weights_timm_missing_names_the_repo(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PretrainedWeightsNotFound, match="timm/pvt_v2_b2.in1k"):
        networks.build_model("pvt", pretrained="imagenet")


def test_imagenet_weights_timm_from_hf_cache(tmp_path, monkeypatch):
    """timm encoders (here through smp's tu-) load their weights from a file in the local HF cache."""
    import huggingface_hub.constants as hf_constants
    import timm

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PretrainedWeightsNotFound, match="timm/convnext_atto"):
        networks.build_model("smp:FPN/tu-convnext_atto", pretrained="imagenet")
    full = timm.create_model("convnext_atto")
    sd = _fake_file_from(full, {})
    _fake_hf_snapshot(tmp_path, timm.models.get_pretrained_cfg("convnext_atto").hf_hub_id, "0" * 40, sd)
    model = networks.build_model("smp:FPN/tu-convnext_atto", pretrained="imagenet")
    own = model.backbone.encoder.model.state_dict()
    assert torch.equal(own["stem_0.weight"], sd["stem.0.weight"])
    assert torch.equal(own["stages_3.blocks.1.conv_dw.weight"], sd["stages.3.blocks.1.conv_dw.weight"])
