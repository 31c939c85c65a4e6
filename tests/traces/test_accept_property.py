"""Property: anything the REST door accepts is stored. Hypothesis builds span batches from hostile parts
(NUL, surrogates, huge and negative numbers, deep JSON, odd times and kinds) and posts them; when the
answer is 202, a worker's projection must store every span of it, with nothing dead-lettered; when it is
not, it must be a 4xx that stored nothing."""
from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apps.traces.models import DeadRecord, IngestBatch, Span

from .helpers import at, drain

pytestmark = pytest.mark.django_db

PLAIN = st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=20)
SCALAR = st.one_of(PLAIN, st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                   st.floats(allow_nan=False, allow_infinity=False))
JSON = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                    st.dictionaries(PLAIN, inner, max_size=3)), max_leaves=10)
# Edges drawn often on purpose (Hypothesis alone rarely reaches 2**63): valid up to 64 levels, 10**12 tokens.
def _deep(n: int):
    return json.loads("[" * n + "]" * n)


DEEP = st.one_of(st.integers(1, 62), st.sampled_from([63, 64])).map(_deep)
COUNT = st.one_of(st.none(), st.integers(min_value=0, max_value=10**6),
                  st.sampled_from([10**12, 10**12 + 1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64]))
SPAN = st.fixed_dictionaries({}, optional={
    "kind": st.sampled_from(["llm", "tool", "agent", "step"]),
    "name": st.one_of(PLAIN.filter(bool), st.just("x" * 500)),
    "start_time": st.sampled_from([at(0), at(5), "1970-01-01T00:00:00Z"]),
    "end_time": st.sampled_from([at(10), "2999-12-31T23:59:59+00:00"]),
    "status": st.sampled_from(["ok", "error", "unset"]),
    "status_message": PLAIN,
    "model": PLAIN,
    "usage": st.fixed_dictionaries({}, optional={"input_tokens": COUNT, "output_tokens": COUNT,
                                                 "reasoning_tokens": COUNT}),
    "stream": st.fixed_dictionaries({}, optional={"chunks": COUNT,
                                                  "output_tokens_per_second": st.floats(0, 1e308)}),
    "tool": st.fixed_dictionaries({"name": PLAIN.filter(bool)}, optional={"arguments": JSON, "result": JSON}),
    "attributes": st.dictionaries(PLAIN, st.one_of(JSON, DEEP.map(lambda v: v[0] if v else v)), max_size=4),
    "details": st.one_of(JSON, DEEP),
    "input_messages": st.one_of(JSON, DEEP),
    "time_to_first_token_ms": st.floats(0, 1e308),
})
# At most one hostile value per batch, so that most batches are otherwise valid and reach the store.
HOSTILE = st.sampled_from([None, None, None, ("name", "nul\x00"), ("name", "half\udfff"), ("name", "x" * 501),
                           ("status_message", "\ud800"), ("attributes", {"k\x00": 1}), ("details", {"a": ["\udc00"]}),
                           ("details", _deep(65)), ("input_messages", {"m": _deep(64)}), ("kind", "banana"),
                           ("start_time", "soon"), ("start_time", "1969-12-31T23:59:59Z"), ("end_time", at(-5))])
_runs = itertools.count()


@pytest.fixture
def agent(project, make_key, key_client):
    return key_client(make_key(project, scopes=["ingest"])[1])


def test_whatever_the_rest_door_accepts_is_stored(agent):
    outcomes: set[int] = set()

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(spans=st.lists(SPAN, min_size=1, max_size=4), hostile=HOSTILE)
    def check(spans, hostile):
        run_id = f"prop-{next(_runs)}"
        for i, s in enumerate(spans):
            s["span_id"] = f"s{i}"
        if hostile:
            spans[-1][hostile[0]] = hostile[1]
        before = IngestBatch.objects.count()
        # ensure_ascii: lone surrogates travel as \\udXXX escapes, as a client's JSON encoder sends them
        r = agent.post(f"/api/v1/runs/{run_id}/spans", data=json.dumps(spans), content_type="application/json")
        outcomes.add(r.status_code)
        if r.status_code != 202:
            assert 400 <= r.status_code < 500, r.content
            assert IngestBatch.objects.count() == before
            return
        drain()
        assert not DeadRecord.objects.exists() and not IngestBatch.objects.filter(status="dead").exists()
        assert Span.objects.filter(run__run_id=run_id).count() == len(spans)

    check()
    assert {202, 400} <= outcomes  # both halves of the property were exercised
