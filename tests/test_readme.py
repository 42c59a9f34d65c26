"""The README's configuration reference is generated from the config models; it must match."""

from pathlib import Path

from tasks.config.reference import BEGIN, END, config_reference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_reference_is_current():
    text = README.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    assert text[start:end] == config_reference(), (
        "README.md's configuration reference is stale: run `python -m tasks.config.reference` "
        "and paste its output between the config-reference markers"
    )
