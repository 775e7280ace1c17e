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
