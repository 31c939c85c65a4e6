"""Everything the run log stores for a project, as one text to search (redaction tests)."""
from __future__ import annotations

import json

from django.forms.models import model_to_dict

from apps.traces.models import IngestBatch, Run, Span, SpanUpdate, ToolCall


def stored_text(project) -> str:
    rows = []
    for model in (Run, Span, SpanUpdate, ToolCall):
        rows += [model_to_dict(obj) for obj in model.objects.filter(project=project)]
    for batch in IngestBatch.objects.filter(project=project):
        rows.append({"payload": batch.payload, "raw": bytes(batch.raw).decode("latin-1") if batch.raw else None})
    return json.dumps(rows, default=str)
