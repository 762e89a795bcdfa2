"""Moved to `substrate_db.loglines` (the log-line contract of the whole library)."""

from ..loglines import *  # noqa: F403
from ..loglines import logger, text  # noqa: F401
