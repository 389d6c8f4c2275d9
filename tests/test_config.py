"""Configuration: defaults, overrides, validation messages, shipped configs, docs/configuration.md coverage."""
from pathlib import Path

import pytest

import fed  # noqa: F401  (every method's section of the schema)
from utils.config import SCHEMA, ConfigError, Key, load_config, parse_override

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_follow_the_official_code():
    cfg = load_config()
    assert cfg.method == "hssf" and cfg.seed == 42
    assert cfg.train.rounds == 200 and cfg.train.warmup_rounds == 20
    assert cfg.train.condensation_epochs == 4 and cfg.train.fusion_epochs == 4
    assert cfg.train.lr == 1e-4 and cfg.train.weight_decay == 0.02 and cfg.train.lr_final_factor == 0.01
    assert cfg.hssf.confide_theta == 4 and cfg.hssf.kl_theta == 10 and cfg.hssf.temperature == 2
    assert cfg.hssf.rpg_threshold == 0.3 and cfg.hssf.sample_threshold == 0.75
    assert cfg.data.size == 384 and cfg.data.batch_size == 4 and cfg.data.shuffle is False
    assert cfg.data.augment_seeding == "official"  # each sample's augmentation seed one of 42
    assert cfg.models.server == "resnet101"
    assert cfg.models.clients == ["resnet18", "resnet18", "resnet34", "resnet34"]


def test_overrides_and_yaml_numbers(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-3\n  rounds: 5\n")  # YAML 1.1 reads 1e-3 as a string
    cfg = load_config(p, ["train.rounds=7", "train.warmup_rounds=2", "hssf.rpg=false", "data.clients=[A, B]",
                          "models.clients=[resnet18, resnet34]", "name=x"])
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.rounds == 7 and cfg.hssf.rpg is False
    assert cfg.data.clients == ["A", "B"] and cfg.output.dir == "runs/x"
    assert parse_override("a.b.c=3") == {"a": {"b": {"c": 3}}}


def test_unknown_key_lists_valid_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  roundz: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "train.roundz" in msg and "Did you mean 'rounds'" in msg
    assert "train.warmup_rounds" in msg  # the valid keys are listed
    with pytest.raises(ConfigError, match="unknown key 'dat'.*Valid keys: name, method"):
        load_config(None, ["dat.size=3"])


def test_type_and_value_errors_are_all_reported():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.size=big", "train.amp=3", "data.batch_size=1", "device=gpu",
                           "train.optimizer=lion", "data.train_val_test=[0.5, 0.1, 0.1]"])
    msg = str(e.value)
    for part in ["data.size: expected int, got str 'big'", "train.amp: expected bool",
                 "data.batch_size: must be >= 2", "device: must be auto, cpu, cuda",
                 "train.optimizer: 'lion' is not one of adamw, adam, sgd", "must sum to 1"]:
        assert part in msg
    assert msg.startswith("6 configuration problem(s)")


def test_cross_checks():
    with pytest.raises(ConfigError, match="models.clients has 2 entries but data.clients has 4"):
        load_config(None, ["models.clients=[resnet18, resnet18]"])
    with pytest.raises(ConfigError, match="warmup_rounds .* > train.rounds"):
        load_config(None, ["train.rounds=3", "train.warmup_rounds=5"])
    import fed

    with pytest.raises(ConfigError, match="method: 'fedfoo' is not one of eln, feddistill, fedmd, fedproto, fixmatch, hssf, ktpfl, local, lssl"):
        fed.load_config(None, ["method=fedfoo"])
    assert load_config(None, ["method=fedfoo"]).method == "fedfoo"  # utils.config knows no methods


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert len(cfg.models.clients) == len(cfg.data.clients)


def _keys(schema, prefix=""):
    for k, v in schema.items():
        if isinstance(v, Key):
            yield prefix + k
        else:
            yield from _keys(v, prefix + k + ".")


def test_configuration_reference_documents_every_key():
    """docs/configuration.md holds what ``python -m fed`` prints now: every method and every key."""
    from fed.__main__ import reference as generated

    reference = (ROOT / "docs" / "configuration.md").read_text()
    missing = [k for k in _keys(SCHEMA) if f"`{k}`" not in reference]
    assert not missing, f"docs/configuration.md does not document: {missing}"
    assert generated().strip() in reference, "docs/configuration.md is out of date: paste the output of python -m fed"
    assert all(f"`{m}`" in reference for m in fed.METHODS)


def test_methods_declare_their_own_sections():
    """Each method's options are its own section of the schema, and a section is defined once."""
    from utils.config import GENERAL, Key, add_section

    assert SCHEMA["fedmd"] is fed.METHODS["fedmd"].options and SCHEMA["hssf"] is fed.METHODS["hssf"].options
    assert list(SCHEMA)[:len(GENERAL) - 1] == [k for k in GENERAL if k != "output"] and list(SCHEMA)[-1] == "output"
    with pytest.raises(ValueError, match="section 'fedmd' is defined twice"):
        add_section("fedmd", {"x": Key(1, int, "x")})
    cfg = load_config(None, ["fedmd.digest_epochs=3"])
    assert cfg.fedmd.digest_epochs == 3 and cfg.rhfl.sce_beta == 1.0
    with pytest.raises(ConfigError, match="fedmd.digest_epoch"):
        load_config(None, ["fedmd.digest_epoch=3"])
    data_only = load_config(None, ["fedmd.digest_epochs=3", "data.size=64"], general_only=True)
    assert "fedmd" not in data_only and data_only.data.size == 64
