"""`clasp demo` refuses bad settings in one line, before any stage runs."""

import pytest

from clasp.cli import main as clasp_main


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config", "no-such-config"], "config file not found: no-such-config"),
        (["optim.no_such_key=1"], "unknown config key optim.'no_such_key'"),
        (["optim.steps"], "is not of the form key.sub=value"),
    ],
)
def test_bad_settings_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "demo"
    assert clasp_main(["demo", "--scale", "tiny", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clasp demo: ") and message in err and "\n" not in err, err
    assert not err.startswith('clasp demo: "')
    assert not out.exists()
