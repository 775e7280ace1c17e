"""The documentation in docs/ builds without a warning and stays true to the code.

* The Sphinx build (what ``make docs`` runs) succeeds with ``-W --keep-going``:
  every warning, including a broken cross-reference or a docstring that is
  not valid reStructuredText, fails the test.
* The configuration table lists every ``Config`` field with its real default.
* The page on the ``chirp`` command mentions every option of every command.
* The code blocks of the pages that carry a ``:name:`` are complete programs;
  they run (with their ports replaced by free ones) and exit 0.
"""

import os
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DOCS = os.path.join(ROOT, "docs")
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from conftest import find_free_port  # noqa: E402

import libchirp  # noqa: E402
from libchirp import cli  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def read(name):
    with open(os.path.join(DOCS, name), encoding="utf-8") as f:
        return f.read()


def test_sphinx_build_has_no_warnings(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            DOCS,
            str(tmp_path / "html"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, "sphinx-build failed:\n%s\n%s" % (res.stdout, res.stderr)
    for page in ("index", "quickstart", "modes", "flow-control", "interfaces", "tls", "cli",
                 "api", "config", "protocol", "architecture", "examples"):  # fmt: skip
        assert (tmp_path / "html" / (page + ".html")).is_file(), page
    api = (tmp_path / "html" / "api.html").read_text()
    for name in ("libchirp.queue.Chirp", "libchirp.pool.Chirp", "libchirp.asyncio.Chirp",
                 "libchirp.Config", "libchirp.Loop", "libchirp.stats.NodeStats",
                 "libchirp.errors.ChirpTimeoutError"):  # fmt: skip
        assert 'id="%s"' % name in api, "%s is not documented in api.html" % name


def config_table():
    """Rows of the table in docs/config.md: field name -> default cell."""
    rows = {}
    for line in read("config.md").splitlines():
        m = re.match(r"\| `([A-Z_0-9]+)` \| ([^|]+) \|", line)
        if m:
            rows[m.group(1)] = m.group(2).strip()
    return rows


def test_config_table_lists_every_field_with_its_default():
    rows = config_table()
    config = libchirp.Config()
    fields = config._asdict()
    assert set(rows) == set(fields)
    for name, default in fields.items():
        if name == "IDENTITY":
            assert default == bytes(16) and rows[name] == "16 zero bytes"
        else:
            assert rows[name] == "`%r`" % (default,), name


def test_cli_page_mentions_every_option():
    page = read("cli.md")
    parser = cli.build_parser()
    missing = []
    for command, sub in parser.commands.items():
        if command == "pki":
            continue
        assert "chirp %s" % command in page
        for action in sub._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help" and option not in page:
                    missing.append("%s %s" % (command, option))
    assert not missing, "docs/cli.md does not mention: " + ", ".join(missing)


def named_snippets():
    """(page, name, code) of every ```{code-block} python``` with a :name: option."""
    found = []
    for page in sorted(os.listdir(DOCS)):
        if not page.endswith(".md"):
            continue
        text = read(page)
        for m in re.finditer(
            r"```\{code-block\} python\n((?::\w+:[^\n]*\n)+)\n(.*?)```", text, re.S
        ):
            options = dict(re.findall(r":(\w+): *([^\n]*)", m.group(1)))
            if "name" in options:
                found.append((page, options["name"], m.group(2)))
    return found


SNIPPETS = named_snippets()


def test_there_are_snippets():
    assert {name for _, name, _ in SNIPPETS} >= {
        "quickstart-request",
        "interfaces-pool",
        "interfaces-asyncio",
    }


@pytest.mark.parametrize("page,name,code", SNIPPETS, ids=[s[1] for s in SNIPPETS])
def test_snippet_runs(page, name, code):
    ports = {}

    def free(m):
        return str(ports.setdefault(m.group(0), find_free_port()))

    program = re.sub(r"\b299[89]\b", free, code)
    res = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, "%s (%s) failed:\n%s\n%s" % (name, page, res.stdout, res.stderr)


# -- references in sources and docs ----------------------------------------------------------------

#: What is searched for references: the sources, tests, docs and build files.
REFERENCE_ROOTS = ["libchirp", "csrc", "tests", "benchmarks", "examples", "docs", "mk",
                   "Makefile", "README.md", ".ci"]  # fmt: skip
TEXT_SUFFIXES = (".py", ".c", ".h", ".md", ".mk", ".rst", ".txt", ".sh", ".ini", ".toml", ".cfg")
#: A reference to a file of the repository: it must exist.
PATH_RX = re.compile(
    r"(?<![\w/.-])((?:libchirp|csrc|tests|benchmarks|examples|docs|mk)/[\w/.-]*\w"
    r"\.(?:py|c|h|md|mk|sh|rst))(#[\w-]+)?"
)
#: References that point outside the repository: a specification that is not
#: in it, and issue numbers of a tracker (the spelling is split so this file
#: does not match itself).
FORBIDDEN = [
    (re.compile("PROTOCOL" + r"\.md"), "a document not in the repository (see docs/)"),
    (re.compile(r"(?i)\b(?:issue|bug|ticket)s?\s*" + "#?" + r"\d+\b"), "an issue number"),
    (re.compile(r"(?<![\w&#])" + "#" + r"\d+\b"), "an issue number"),
]
#: Files the build generates, not kept in the repository.
GENERATED = {"libchirp/_ffi.c"}
#: Numbered things that are not issues: the C core's "certificate #N" messages.
NOT_ISSUES = re.compile(r"certificate #\d")


def reference_files():
    for top in REFERENCE_ROOTS:
        path = os.path.join(ROOT, top)
        if os.path.isfile(path):
            yield top
            continue
        for base, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if d not in ("seeds", "_build", "__pycache__")]
            for name in files:
                if name.endswith(TEXT_SUFFIXES) or name in ("Makefile", "run"):
                    yield os.path.relpath(os.path.join(base, name), ROOT)


def heading_anchors(page):
    """The anchors MyST gives the headings of ``page`` (myst_heading_anchors = 3)."""
    anchors = set()
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        for line in f:
            m = re.match(r"#{1,3} (.+)", line)
            if m:
                text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
                anchors.add(text.replace(" ", "-"))
    return anchors


def test_no_reference_points_outside_the_repository():
    """Comments and docs point to files that exist (and headings that exist), never to
    documents outside the repository or to issue numbers."""
    problems = []
    for rel in sorted(reference_files()):
        with open(os.path.join(ROOT, rel), encoding="utf-8", errors="replace") as f:
            text = f.read()
        for number, line in enumerate(text.splitlines(), 1):
            where = "%s:%d" % (rel, number)
            for rx, what in FORBIDDEN:
                for m in rx.finditer(NOT_ISSUES.sub("", line)):
                    problems.append("%s: %r is %s" % (where, m.group(0), what))
            for m in PATH_RX.finditer(line):
                target, anchor = m.group(1), m.group(2)
                if target in GENERATED or re.search(r"/[A-Z]+\.", target):  # e.g. NAME.py
                    continue
                if not os.path.exists(os.path.join(ROOT, target)):
                    problems.append("%s: %s does not exist" % (where, target))
                elif anchor and target.endswith(".md"):
                    if anchor[1:] not in heading_anchors(target):
                        problems.append("%s: %s has no heading %s" % (where, target, anchor))
    assert not problems, "\n".join(problems)
