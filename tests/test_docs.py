"""The docs stay true: the config reference matches the code, and links between pages resolve."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)


def _generator():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_up_to_date() -> None:
    gen = _generator()
    doc = ROOT / "docs" / "config.md"
    assert doc.exists(), f"docs/config.md is missing; generate it with: {gen.COMMAND}"
    assert doc.read_text() == gen.render(), f"docs/config.md is stale; regenerate it with: {gen.COMMAND}"


def test_config_reference_covers_every_field() -> None:
    from dataclasses import fields

    from lmsprint.config import SECTIONS

    text = _generator().render()
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            assert f"| `{section}.{f.name}` |" in text


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_markdown_links_resolve(page: Path) -> None:
    """Every relative link to a .md page (README.md and docs/*.md) points at a file that exists."""
    missing = []
    for target in LINK.findall(page.read_text()):
        path = target.split("#", 1)[0]
        if "://" in target or target.startswith("mailto:") or not path.endswith(".md"):
            continue
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} links to missing pages: {', '.join(missing)}"


@pytest.mark.parametrize("first", ["", "import lmsprint.training.trainer; "])
def test_the_python_api_of_the_readme_imports_functions(first: str) -> None:
    """``from lmsprint import build_config, train, prepare`` gives the functions, whatever was imported before
    (a subpackage named ``train`` once shadowed the function)."""
    import subprocess
    import sys

    code = (f"{first}from lmsprint import build_config, prepare, train; import inspect; "
            "assert all(inspect.isfunction(f) for f in (build_config, prepare, train)), (build_config, prepare, train)")
    src = Path(__file__).resolve().parents[1] / "src"
    proc = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
