"""Every ingest test starts and ends with the receiver's backlog gauge cleared (it is per process)."""
import pytest

from apps.ingest import services as ingest


@pytest.fixture(autouse=True)
def _fresh_backlog():
    ingest.backlog.reset()
    yield
    ingest.backlog.reset()
