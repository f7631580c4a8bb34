"""Moved to `recare.jobs.zerogpu`; this name stays for code written against it."""

from recare.jobs.zerogpu import *  # noqa: F401,F403
