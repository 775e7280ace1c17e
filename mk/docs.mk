# mk/docs.mk: the Sphinx documentation. Included by the main Makefile
# (`include mk/docs.mk`), whose PY, VENV and build targets it uses.
#
#   make docs    HTML into build/docs; every Sphinx warning is an error
#
# autodoc imports libchirp from the source tree, so the extension is built
# first. sphinx and myst-parser come from requirements-dev.txt (the venv).

DOCS_SRC := docs
DOCS_OUT := build/docs
SPHINX_BUILD := $(VENV)/bin/sphinx-build
SPHINX_FLAGS ?= -W --keep-going -q

.PHONY: docs

docs: build
	rm -rf $(DOCS_OUT) build/docs-doctrees
	$(SPHINX_BUILD) $(SPHINX_FLAGS) -b html -d build/docs-doctrees $(DOCS_SRC) $(DOCS_OUT)
	@echo "docs: $(DOCS_OUT)/index.html"
