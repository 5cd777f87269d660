import subprocess
import sys


def test_version_and_help_run():
    out = subprocess.run(
        [sys.executable, "-m", "clasp", "version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("clasp-triton ") and "torch " in out and "triton " in out
    help_text = subprocess.run(
        [sys.executable, "-m", "clasp", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "version" in help_text


def test_kernels_import_without_open_clip_or_timm():
    code = (
        "import sys, clasp.kernels; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('open_clip', 'timm')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
