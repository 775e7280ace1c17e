"""The logger of libchirp (``logging.getLogger("libchirp")``), shared by the modules."""

from __future__ import annotations

import logging

logger = logging.getLogger("libchirp")
