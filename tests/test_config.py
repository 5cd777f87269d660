import os

import pytest

from clasp.config import load_config, load_yaml, packaged_configs, parse_override, resolve_config

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


def test_a_packaged_config_is_found_by_name_inside_the_package():
    import clasp

    package = os.path.dirname(os.path.abspath(clasp.__file__))
    assert packaged_configs() == ["demo", "vit-b", "vit-s"]
    for name in packaged_configs():
        path = resolve_config(name)
        assert os.path.dirname(path) == os.path.join(package, "configs")
        assert resolve_config(f"{name}.yaml") == path
        with open(path) as f:
            assert isinstance(load_yaml(f), dict)


def test_an_existing_file_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("name: mine\n")
    assert resolve_config("demo") == "demo"
    assert load_config(DEFAULTS, "demo")["name"] == "mine"


def test_an_unknown_name_or_missing_path_lists_the_packaged_configs(tmp_path):
    for value in ("vit-xl", str(tmp_path / "demo.yaml")):
        with pytest.raises(FileNotFoundError, match="config file not found.*demo, vit-b, vit-s"):
            resolve_config(value)


def test_pretrain_builds_from_a_packaged_name_as_from_its_path():
    from clasp.train.config import build_config

    by_name = build_config("vit-s", ["optim.steps=3"])
    assert by_name == build_config(resolve_config("vit-s"), ["optim.steps=3"])
    assert by_name["optim"]["steps"] == 3 and by_name["model"]["embed_dim"] == 384
