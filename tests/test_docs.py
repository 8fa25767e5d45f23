"""The repository's documentation is self-contained: no file cites notes outside the repository, and every
citation of docs/method.md names one of its sections."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHOD = ROOT / "docs" / "method.md"

# Built by concatenation so this file does not contain the strings it looks for.
OUTSIDE_NEEDLES = ("DESIGN" + ".md", ".." + "/shared", "shared" + "/reference")

# The one citation form: `docs/method.md, section N`. Any mention of a method.md section is checked against it.
CITATION = re.compile(r"docs/method\.md, section (\d+)")
ANY_SECTION_MENTION = re.compile(r"method\.md[,;:]?\s+[Ss]ections?\s+\d+")
HEADING = re.compile(r"^## (\d+)\. \S", re.MULTILINE)


def repo_text_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files of the repository that are text (no NUL byte, valid UTF-8)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    files = []
    for name in filter(None, listed):
        path = ROOT / name
        if not path.is_file():  # deleted in the working tree, or a submodule
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


def _lines(path: Path):
    yield from enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)


def test_no_file_cites_notes_outside_the_repository():
    hits = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
            for path in repo_text_files() for number, line in _lines(path)
            if any(needle in line for needle in OUTSIDE_NEEDLES)]
    assert not hits, "files cite notes outside the repository; cite docs/method.md instead:\n" + "\n".join(hits)


def method_sections() -> set[int]:
    return {int(n) for n in HEADING.findall(METHOD.read_text(encoding="utf-8"))}


def test_method_doc_has_numbered_sections():
    assert METHOD.is_file(), "docs/method.md is missing"
    assert {1, 2, 3, 4, 5} <= method_sections()


def test_every_method_citation_names_an_existing_section():
    sections = method_sections()
    problems = []
    for path in repo_text_files():
        for number, line in _lines(path):
            where = f"{path.relative_to(ROOT)}:{number}"
            for match in ANY_SECTION_MENTION.finditer(line):
                start = max(0, match.start() - len("docs/"))
                if not CITATION.match(line, start):
                    problems.append(f"{where}: {match.group(0)!r} is not in the form 'docs/method.md, section N'")
            for match in CITATION.finditer(line):
                if int(match.group(1)) not in sections:
                    problems.append(f"{where}: cites section {match.group(1)}, but docs/method.md has "
                                    f"sections {sorted(sections)}")
    assert not problems, "\n".join(problems)
