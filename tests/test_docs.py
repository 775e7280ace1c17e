"""The documentation in docs/ builds without a warning and stays true to the code.

* The Sphinx build (what ``make docs`` runs) succeeds with ``-W --keep-going``:
  every warning, including a broken cross-reference or a docstring that is
  not valid reStructuredText, fails the test.
* The configuration table lists every ``Config`` field with its real default.
* The page on the ``chirp`` command mentions every option of every command.
* Every Python code block of README.md and docs/ is a complete program and runs
  (servers with a partner, see :class:`Snippet`), with free ports.
* Comments and docs refer only to files and headings that exist, never to a
  document outside the repository or to issue numbers.
"""

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DOCS = os.path.join(ROOT, "docs")
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from conftest import SANITIZER, find_free_port  # noqa: E402

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


FENCE = re.compile(
    r"^(?:<!-- snippet: (?P<marker>[^\n]*?) -->\n)?"
    r"```(?:(?P<lang>python|sh)|\{code-block\} (?P<blang>python))\n"
    r"(?P<options>(?::\w+:[^\n]*\n)+\n)?"
    r"(?P<code>.*?)^```$",
    re.S | re.M,
)


class Snippet:
    """A code block of README.md or docs/*.md and how the tests run it.

    Every ``python`` block is a complete program and runs as is. An HTML
    comment on the line before a block says when it needs more:

    * ``<!-- snippet: server; partner: next -->``: it runs until stopped; it is
      started, then the next block of the page runs against it (and must exit
      0), then the server is stopped. ``partner: chirp ...`` names a ``chirp``
      command as the partner instead.
    * ``<!-- snippet: pki -->``: it runs in a directory holding ``node.pem`` and
      ``dh.pem`` made by ``chirp pki``.

    ``sh`` blocks run only as such partners or servers (each line a command,
    with the ``chirp`` of the virtual environment). Ports 2998 and 2999 are
    replaced by free ones, the same in a server and its partner.
    """

    def __init__(self, page, number, lang, code, marker, name):
        self.page, self.number, self.lang, self.code = page, number, lang, code
        self.marker = marker or ""
        self.name = name or "%s-%d" % (page.replace(".md", ""), number)
        self.partner = None

    @property
    def server(self):
        return self.marker.startswith("server")


def snippets():
    """Every python block (and each sh block with a marker) of README.md and docs/."""
    found = []
    pages = ["../README.md"] + sorted(p for p in os.listdir(DOCS) if p.endswith(".md"))
    for page in pages:
        blocks = []
        for m in FENCE.finditer(read(page)):
            options = dict(re.findall(r":(\w+): *([^\n]*)", m.group("options") or ""))
            lang = m.group("lang") or m.group("blang")
            blocks.append(
                Snippet(os.path.basename(page), len(blocks) + 1, lang, m.group("code"),
                        m.group("marker"), options.get("name"))
            )  # fmt: skip
        partners = set()
        for i, snippet in enumerate(blocks):
            if snippet.server:
                partner = snippet.marker.split("partner:", 1)[1].strip()
                if partner == "next":
                    snippet.partner = blocks[i + 1]
                    partners.add(i + 1)
                else:
                    snippet.partner = Snippet(page, 0, "sh", partner + "\n", "", None)
        for i, snippet in enumerate(blocks):
            if i not in partners and (snippet.lang == "python" or snippet.marker):
                found.append(snippet)
    return found


SNIPPETS = snippets()


def test_there_are_snippets():
    names = {s.name for s in SNIPPETS}
    assert names >= {"quickstart-request", "interfaces-pool", "interfaces-asyncio"}
    pages = {s.page for s in SNIPPETS}
    assert {"README.md", "quickstart.md", "cli.md", "modes.md", "tls.md"} <= pages
    assert sum(s.server for s in SNIPPETS) >= 5


def venv_env():
    """The environment of a user after ``make build``: .venv's bin first on PATH."""
    bindir = os.path.dirname(sys.executable)
    return dict(os.environ, PYTHONPATH=ROOT, PATH=bindir + os.pathsep + os.environ["PATH"])


def command(snippet, code):
    if snippet.lang == "python":
        return [sys.executable, "-c", code]
    lines = code.strip().splitlines()
    if len(lines) == 1:  # one command: run it directly, so signals reach it
        return shlex.split(lines[0])
    return ["sh", "-ec", code]


def wait_listening(port, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.name for s in SNIPPETS])
def test_snippet_runs(snippet, tmp_path):
    if SANITIZER == "tsan" and "multiprocessing.Process(" in snippet.code:
        # Python's default start method on Linux is fork, from a process whose
        # Loop has threads: TSan's runtime refuses threads in such a child.
        pytest.skip("TSan does not support threads after a multi-threaded fork")
    ports = {}

    def free(m):
        return str(ports.setdefault(m.group(0), find_free_port()))

    def ported(code):
        return re.sub(r"\b299[89]\b", free, code)

    if "pki" in snippet.marker:
        ca, node, dh = (str(tmp_path / n) for n in ("chirp-ca", "node.pem", "dh.pem"))
        for step in (["ca", "--out", ca], ["node", "--ca", ca, "--out", node], ["dh", "--out", dh]):
            assert cli.main(["pki", *step]) == 0
    env = venv_env()
    if shutil.which("chirp", path=env["PATH"]) is None:
        pytest.fail("no chirp command next to %s: run make build" % sys.executable)
    code = ported(snippet.code)
    run = dict(cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if not snippet.server:
        res = subprocess.run(command(snippet, code), timeout=60, **run)
        assert res.returncode == 0, "%s failed:\n%s\n%s" % (snippet.name, res.stdout, res.stderr)
        return
    server = subprocess.Popen(
        command(snippet, code), cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        port = int(ports.get("2998") or ports["2999"])
        assert wait_listening(port, server), "%s does not listen" % snippet.name
        partner = snippet.partner
        res = subprocess.run(command(partner, ported(partner.code)), timeout=60, **run)
        assert res.returncode == 0, "partner of %s failed:\n%s\n%s" % (
            snippet.name, res.stdout, res.stderr,
        )  # fmt: skip
        assert server.poll() is None, "%s ended early" % snippet.name
    finally:
        server.send_signal(signal.SIGINT)  # what a user does: Ctrl-C
        try:
            server.wait(10)
            interrupted = True
        except subprocess.TimeoutExpired:
            interrupted = False
            server.kill()
            server.wait(10)
        output = server.stdout.read()
        server.stdout.close()
    assert interrupted, "%s did not end within 10 s of Ctrl-C:\n%s" % (snippet.name, output)
    assert "Traceback" not in output or "KeyboardInterrupt" in output, output


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
