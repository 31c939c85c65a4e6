"""How PostgreSQL stores the large values of the run log (nothing changes elsewhere).

Profiling the OTLP benchmark showed PostgreSQL compressing every inbox payload with pglz: a 500-span
OTLP batch is ~560 KB of protobuf, which barely compresses, and the attempt made the accept INSERT
cost ~35 ms. So an inbox batch's ``raw`` is stored out of line uncompressed (it lives until the
batch is projected, seconds), and the JSON columns that carry content (messages, attributes, tool
arguments and results, run inputs and outputs) compress with lz4 where the server has it, which is
several times cheaper than pglz for a similar size. A server built without lz4 keeps pglz.
"""
from django.db import migrations

LZ4_COLUMNS = {
    "traces_ingestbatch": ("payload",),
    "traces_span": ("details", "input_messages", "output_messages", "tool", "attributes", "events"),
    "traces_spanupdate": ("fields",),
    "traces_toolcall": ("arguments", "result"),
    "traces_run": ("input", "output", "metadata", "error_details"),
}


def _lz4(table: str, column: str, method: str) -> str:
    return (f"DO $$ BEGIN ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION {method}; "
            f"EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN NULL; END $$")


def _apply(schema_editor, storage: str, compression: str) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(f"ALTER TABLE traces_ingestbatch ALTER COLUMN raw SET STORAGE {storage}")
    for table, columns in LZ4_COLUMNS.items():
        for column in columns:
            schema_editor.execute(_lz4(table, column, compression))


def forwards(apps, schema_editor):
    _apply(schema_editor, "EXTERNAL", "lz4")


def backwards(apps, schema_editor):
    _apply(schema_editor, "EXTENDED", "default")


class Migration(migrations.Migration):
    dependencies = [("traces", "0005_run_quiet_index")]
    operations = [migrations.RunPython(forwards, backwards)]
