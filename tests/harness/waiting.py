"""Polling helper for tests that wait on the cluster (no timing assertions, only deadlines)."""

from __future__ import annotations

import time


def wait_for(check, timeout: float = 120, what: str = "condition", interval: float = 0.25):
    """Return check()'s first truthy value; fail with the last value seen after `timeout`."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = check()
        except Exception as e:  # e.g. 404 while the object is not created yet
            last = e
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)
