# mk/load.mk: load targets, outside CI.
# Included at the end of the main Makefile (`include mk/load.mk`), whose PY and
# build target it uses.
#
#   make soak [SOAK_SECONDS=600]  steady traffic between two processes (requests and
#                                 one-way, connection churn); samples RSS and fds of
#                                 both and fails if either grows (benchmarks/soak.py)
#   make bench-memory             RSS per idle connection of a node holding 1,000
#                                 (target: <= 64 KiB; benchmarks/memory.py)
#
# The CI part of the load work is tests/test_load.py (10,000 connections), which
# `make test` runs with the rest of the suite.

SOAK_SECONDS ?= 600
SOAK_ARGS ?=

.PHONY: soak bench-memory

soak: build
	SOAK_SECONDS=$(SOAK_SECONDS) $(PY) benchmarks/soak.py $(SOAK_ARGS)

bench-memory: build
	$(PY) benchmarks/memory.py
