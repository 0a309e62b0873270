"""The session's daemon for the fault-injection table (`fault_feed.Feed`)."""

import pytest
from fault_feed import Feed


@pytest.fixture(scope="session")
def feed(tmp_path_factory):
    pytest.importorskip("zmq")
    feed = Feed(tmp_path_factory.mktemp("fault"))
    feed.start()
    yield feed
    feed.close()
