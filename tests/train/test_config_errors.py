"""Bad pre-training settings exit 2 with one line naming the key and what is wrong, before
any data is read or model built; nothing is written."""

import pytest

from clasp.cli import main as clasp_main
from clasp.config import ConfigError, load_config
from clasp.train.config import DEFAULTS


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.steps=abc"], "optim.steps must be an integer (default 10000), got 'abc'"),
        (["optim.lr=abc"], "optim.lr must be a number (default 0.0005), got 'abc'"),
        (["model.img_size=abc"], "model.img_size must be a list like [256, 128], got 'abc'"),
        (["model.img_size=[64, x]"], "model.img_size[1] must be an integer"),
        (["train.progress=1"], "train.progress must be true or false"),
        (["optim.lr=[1,"], "the value is not valid YAML"),
        (["optim=3"], "optim is a section of"),
        (["data.batch_size=0"], "data.batch_size must be a whole number >= 1, got 0"),
        (["optim.steps=0"], "optim.steps must be a positive whole number"),
        (["optim.steps=2.5"], "optim.steps must be a positive whole number"),
        (["train.checkpoint_every=0"], "train.checkpoint_every must be a positive whole number"),
        (["model.patch_size=0"], "model.patch_size must be a positive integer, got 0"),
        (["model.img_size=[250, 128]"], "must be a multiple of model.patch_size 16"),
        (
            ["model.embed_dim=192", "model.num_heads=5"],
            "model.embed_dim 192 must be divisible by model.num_heads 5",
        ),
        (["model.moe.top_k=9"], "model.moe.top_k must be in [1, model.moe.num_experts=4]"),
        (["loss.shared_task_grad=1.5"], "loss.shared_task_grad must be in [0, 1], got 1.5"),
    ],
)
def test_bad_values_exit_2_naming_the_key(tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    args = ["pretrain", f"data.root={tmp_path}", f"output_dir={out}", *overrides]
    assert clasp_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clasp pretrain: ") and "\n" not in err, err
    assert message in err, err
    assert not out.exists()


def test_a_malformed_yaml_file_names_the_file_and_the_line(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("optim:\n  lr: 1e-3\n  steps: [10\nmodel: {}\n")
    assert clasp_main(["pretrain", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"clasp pretrain: config file {config} is not valid YAML") and (
        "line 4" in err
    ), err
    assert "\n" not in err
    config.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="holds a list, not a mapping"):
        load_config(DEFAULTS, str(config))


def test_values_of_the_defaults_type_pass_and_whole_floats_become_ints():
    config = load_config(
        DEFAULTS, None, ["optim.steps=1e4", "optim.lr=1", "data.labels=/x", "model.prompt_dim=8"]
    )
    assert config["optim"]["steps"] == 10000 and isinstance(config["optim"]["steps"], int)
    assert config["optim"]["lr"] == 1 and config["data"]["labels"] == "/x"


def test_shared_task_grad_below_1_is_refused_in_a_distributed_run():
    from clasp.train.distributed import World
    from clasp.train.step import check_loss_config

    config = load_config(DEFAULTS, None, ["loss.shared_task_grad=0.5"])
    check_loss_config(config, World())  # one process: fine
    with pytest.raises(ValueError, match="DDP and FSDP do not support"):
        check_loss_config(config, World(rank=0, size=2))
