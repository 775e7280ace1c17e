"""Sphinx configuration of the libchirp documentation (``make docs``).

The pages are Markdown (MyST) except the API reference, which is
reStructuredText for autodoc. autodoc imports the package from the source tree,
so the extension must be built first (``make build``; ``make docs`` does it).
The build runs with ``-W --keep-going``: every warning fails it.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import libchirp  # noqa: E402

project = "libchirp"
author = "the libchirp authors"
copyright = "libchirp authors"
version = release = libchirp.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Markdown: anchors for headings down to level 3, so pages can link to sections.
myst_heading_anchors = 3

# autodoc: members in source order, type hints in the description, and nothing
# private. The package imports the compiled core; a missing build fails loudly.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"undoc-members": False}
# Overrides without a docstring of their own (e.g. ChirpFuture.result) would
# inherit the standard library's, which is not reStructuredText.
autodoc_inherit_docstrings = False
# Module docstrings are written for readers of the source ("Theory of operation"
# sections); the API page documents classes and functions, not whole modules.

html_theme = "alabaster"
html_title = "libchirp %s" % release
html_theme_options = {
    "description": "Message-passing between nodes over TCP/TLS, compatible with libchirp 1.x",
    "fixed_sidebar": True,
}
html_static_path = []
