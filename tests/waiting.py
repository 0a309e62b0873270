"""Polling for what another thread or process does, for the tests of the running daemon."""

import time


def wait_until(predicate, timeout, what, *, ignore=(), interval=0.1):
    """Call ``predicate`` until it returns something true, and return that; fail naming ``what`` after ``timeout`` s.

    ``ignore``: exceptions that only mean "not yet" (a server still starting, a file caught mid-write).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except ignore:
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
