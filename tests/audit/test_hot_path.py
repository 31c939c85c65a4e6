"""The audit chain's lock serialises audited changes, never the run log's traffic: while another session
holds it (an audited change committing slowly, say), writes are accepted, projected and read as usual."""
import psycopg
import pytest
from django.db import OperationalError, connection, transaction

from apps.audit.services import _CHAIN_LOCK_KEY
from apps.projects import services as project_services
from apps.traces.models import Run, Span
from tests.traces.helpers import drain

# Committed transactions: the fixtures' own audited writes (creating the project) must release the lock first.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def writer(project, make_key, key_client):
    """An agent's client (minting its key is audited: done before the lock is taken)."""
    return key_client(make_key(project)[1])


@pytest.fixture
def chain_lock_held_elsewhere():
    if connection.vendor != "postgresql":
        pytest.skip("the chain lock is PostgreSQL's advisory lock")
    db = connection.settings_dict
    other = psycopg.connect(dbname=db["NAME"], user=db["USER"], host=db["HOST"], port=db["PORT"] or 5432,
                            password=db["PASSWORD"] or None, autocommit=True)
    other.execute("SELECT pg_advisory_lock(%s)", [_CHAIN_LOCK_KEY])
    with connection.cursor() as cursor:
        cursor.execute("SET lock_timeout = '2s'")  # a wait on the lock fails the test rather than hang it
    try:
        yield
    finally:
        other.close()


def test_ingest_projection_and_reads_never_wait_on_the_audit_chain(writer, chain_lock_held_elsewhere):
    c = writer
    assert c.post("/api/v1/runs", {"run_id": "r-1", "agent": {"name": "bot"}}, format="json").status_code == 202
    assert c.post("/api/v1/runs/r-1/spans", [{"span_id": "s-1", "kind": "llm", "usage": {"input_tokens": 3}}],
                  format="json").status_code == 202
    assert c.patch("/api/v1/runs/r-1/spans/s-1", {"status": "ok"}, format="json").status_code == 202
    assert c.post("/api/v1/runs/r-1/finish", {"status": "completed"}, format="json").status_code == 202
    drain()
    assert Run.objects.get(run_id="r-1").status == "completed" and Span.objects.count() == 1
    assert c.get("/api/v1/runs/r-1").status_code == 200


def test_an_audited_change_does_wait_on_it(project, chain_lock_held_elsewhere):
    """The same fixture blocks what is audited: the test above would fail if the hot path were audited."""
    with pytest.raises(OperationalError), transaction.atomic():
        project_services.api_key_create(project=project, name="k", scopes=["read"], actor=None)
