"""Every document the code and docs point a reader to exists in the repository.

Scanned: every .py and .md file that git tracks (or would track: new, not ignored). Checked:
  - paths under docs/, minipost/ and tests/ ending in .md, .py, .json, .txt or .ini;
  - a `tests/<file>.py::<name>` reference also names a function or class of that file;
  - bare `<name>.py` file names (scripts, or modules named beside their package's other modules),
    which must be the name of some file of the repository;
  - UPPERCASE `.md` names (README.md, ...), which must exist too.
Paths under other folders (`out/scoreboard.md`, `path/adapter_config.json`) and bare .json/.txt
names are outputs or placeholders, not documents, and are not checked.
"""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SELF = "tests/test_docs.py"

# Placeholders a text uses for "your script", not files of this repository.
ALLOWED = {"script.py", "my_rewards.py"}

PATH = re.compile(r"(?<![\w./-])((?:docs|minipost|tests)/[\w./-]*?\.(?:md|py|json|txt|ini))\b"
                  r"(?:::(\w+))?")
BARE_PY = re.compile(r"(?<![\w./-])([\w-]+\.py)\b")
CAPS_MD = re.compile(r"(?<![\w./-])([A-Z][A-Z0-9_-]*\.md)\b")
# Written in two pieces so that this file does not mention it either.
RETIRED = "PIT" + "FALLS"


def repository_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return [p for p in out.splitlines() if (ROOT / p).is_file()]


def dangling_references(texts: dict[str, str], files: set[str]) -> list[str]:
    """'file:line: reference' for each reference in `texts` (path -> text) that `files` lacks."""
    basenames = {p.rsplit("/", 1)[-1] for p in files}
    bad = []
    for path, text in texts.items():
        for lineno, line in enumerate(text.splitlines(), 1):
            for m in PATH.finditer(line):
                ref, name = m.group(1), m.group(2)
                if ref not in files:
                    bad.append(f"{path}:{lineno}: {ref}")
                elif name and not re.search(rf"^\s*(?:def|class) {name}\b", texts.get(ref, ""),
                                            re.M):
                    bad.append(f"{path}:{lineno}: {ref}::{name}")
            for m in BARE_PY.finditer(line):
                if m.group(1) not in basenames and m.group(1) not in ALLOWED:
                    bad.append(f"{path}:{lineno}: {m.group(1)}")
            for m in CAPS_MD.finditer(line):
                if m.group(1) not in basenames:
                    bad.append(f"{path}:{lineno}: {m.group(1)}")
    return bad


def test_every_cited_document_exists():
    files = repository_files()
    texts = {p: (ROOT / p).read_text(encoding="utf-8") for p in files if p.endswith((".py", ".md"))}
    assert texts
    cited = {p: text for p, text in texts.items() if p != SELF}   # its examples are made up
    assert dangling_references(cited, set(files)) == []
    assert [p for p, text in texts.items() if RETIRED in text] == []


def test_the_scan_catches_what_it_should_and_nothing_else():
    files = {"docs/a.md", "minipost/m.py", "tests/test_t.py", "train.py", "README.md"}
    texts = {"tests/test_t.py": "def test_here():\n    pass\n",
             "minipost/m.py": "docs/a.md, tests/test_t.py::test_here, m.py, train.py, README.md;\n"
                              "writes out/scores.md, config.json, path/adapter_config.json\n"
                              "and https://example.org/docs/elsewhere.md\n",
             "docs/a.md": "docs/b.md\ntests/test_t.py::test_gone\nNOTES.md\nother.py\n"}
    assert dangling_references(texts, files) == [
        "docs/a.md:1: docs/b.md", "docs/a.md:2: tests/test_t.py::test_gone",
        "docs/a.md:3: NOTES.md", "docs/a.md:4: other.py"]
