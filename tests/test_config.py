import pytest

import kl_autoencoder as ka
from kl_autoencoder.config import ConfigError, config_from_dict, load_config, parse_override


def test_presets_listed():
    names = ka.list_presets()
    for n in ("sd-kl-f8", "kl-f8c16", "tiny-kl-f8"):
        assert n in names


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": {"latent_chanels": 4}})
    msg = str(e.value)
    assert "model.latent_chanels" in msg and "latent_channels" in msg and "block_out_channels" in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match="valid keys: model, loss, train, data"):
        config_from_dict({"optim": {}})


def test_types_checked_and_lists_become_tuples():
    cfg = config_from_dict({"model": {"block_out_channels": [32, 64]}, "train": {"lr": "1e-4", "betas": [0.5, 0.9]}})
    assert cfg.model.block_out_channels == (32, 64)
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.betas == (0.5, 0.9)
    with pytest.raises(ConfigError, match="train.batch_size: expected an integer"):
        config_from_dict({"train": {"batch_size": 2.5}})
    with pytest.raises(ConfigError, match="loss.reconstruction='l3'"):
        config_from_dict({"loss": {"reconstruction": "l3"}})


def test_overrides():
    assert parse_override("train.lr=1e-4") == (["train", "lr"], 1e-4)
    assert parse_override("loss.perceptual=none") == (["loss", "perceptual"], "none")
    cfg = load_config("tiny-kl-f8", ["train.lr=3e-4", "loss.perceptual=none", "model.block_out_channels=[32,64,64,64]"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.loss.perceptual == "none"
    assert cfg.model.block_out_channels == (32, 64, 64, 64)
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config("tiny-kl-f8", ["train.lrr=1"])


def test_config_roundtrips_through_yaml(tmp_path):
    cfg = load_config("tiny-kl-f8")
    path = tmp_path / "resolved.yaml"
    cfg.save(path)
    assert load_config(path) == cfg


def test_unknown_preset_names_the_presets():
    with pytest.raises(FileNotFoundError, match="tiny-kl-f8"):
        load_config("no-such-preset")


def test_colour_weight_checked():
    assert config_from_dict({"loss": {"colour_weight": 25}}).loss.colour_weight == 25
    with pytest.raises(ConfigError, match="loss.colour_weight=-1"):
        config_from_dict({"loss": {"colour_weight": -1}})


def test_crop_sizes_checked():
    cfg = config_from_dict({"data": {"crop_sizes": [128, 256]}})
    assert cfg.data.crop_sizes == (128, 256)
    with pytest.raises(ConfigError, match="data.crop_size\\(s\\)=100 must be a positive multiple of 8"):
        config_from_dict({"data": {"crop_sizes": [128, 100]}})
    with pytest.raises(ConfigError, match="data.crop_sizes=\\[\\]"):
        config_from_dict({"data": {"crop_sizes": []}})
