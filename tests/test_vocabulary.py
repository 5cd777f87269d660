"""The part and attribute vocabulary sits below data and teacher: both read the same one."""

import subprocess
import sys

import pytest

from clasp.vocabulary import DEFAULT_PROMPTS, Prompts, load_prompts


def test_data_reads_the_vocabulary_without_importing_the_teacher_or_open_clip():
    code = (
        "import sys, clasp.vocabulary, clasp.data.synthetic; "
        "bad = [m for m in sys.modules if m.startswith('clasp.teacher') "
        "or m.split('.')[0] == 'open_clip']; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_teacher_re_exports_the_vocabulary():
    import clasp.teacher

    assert clasp.teacher.Prompts is Prompts and clasp.teacher.load_prompts is load_prompts


def test_the_packaged_vocabulary_names_parts_and_flat_attributes():
    prompts = load_prompts()
    assert DEFAULT_PROMPTS.endswith("clasp/prompts.yaml")
    assert prompts.part_names[0] == "background" and len(prompts.part_names) >= 2
    assert sum(prompts.group_sizes) == len(prompts.attribute_names)
    assert all("=" in name for name in prompts.attribute_names)


def test_a_malformed_vocabulary_is_refused_with_every_problem(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text(
        "templates: ['no placeholder']\nparts: {only: [one]}\nattributes: {g: {v: []}}\n"
    )
    with pytest.raises(ValueError, match="template.*'parts' needs at least two.*group 'g'"):
        load_prompts(str(path))
