import pytest

from clasp.config import load_config, parse_override

DEFAULTS = {"model": {"dim": 64, "experts": 4}, "optim": {"lr": 1e-3}, "name": "demo"}


def test_file_and_overrides_merge_over_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  dim: 128\nname: vit-s\n")
    config = load_config(DEFAULTS, str(path), ["optim.lr=5e-4", "model.experts=8"])
    assert config == {"model": {"dim": 128, "experts": 8}, "optim": {"lr": 5e-4}, "name": "vit-s"}
    assert DEFAULTS["model"]["dim"] == 64  # defaults untouched


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(KeyError, match="model.depth"):
        load_config(DEFAULTS, None, ["model.depth=3"])


def test_override_without_equals_is_an_error():
    with pytest.raises(ValueError, match="key.sub=value"):
        parse_override("model.dim")


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(DEFAULTS, str(tmp_path / "nope.yaml"))
