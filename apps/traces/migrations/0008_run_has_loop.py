"""``Run.has_loop``: the run log's list can be filtered to runs holding a loop (``?has_loop=true``).

The projection sets the flag from now on; the backfill sets it for the runs already stored, with one
UPDATE: runs holding a span of a loop kind, or a span a late update turned into one (the projection
reads the effective span, so the backfill does too). The kinds are written out here rather than
imported: a migration keeps the values of its day.
"""
from django.db import migrations, models

LOOP_KINDS = ["loop", "loop.iteration", "loop.move"]


def backfill(apps, schema_editor):
    Run = apps.get_model("traces", "Run")
    Span = apps.get_model("traces", "Span")
    SpanUpdate = apps.get_model("traces", "SpanUpdate")
    looping = (models.Q(pk__in=Span.objects.filter(kind__in=LOOP_KINDS).values("run_id"))
               | models.Q(pk__in=SpanUpdate.objects.filter(fields__kind__in=LOOP_KINDS).values("run_id")))
    Run.objects.filter(looping).update(has_loop=True)


class Migration(migrations.Migration):

    dependencies = [
        ('projects', '0004_retention_days'),
        ('traces', '0007_dead_records'),
    ]

    operations = [
        migrations.AddField(
            model_name='run',
            name='has_loop',
            field=models.BooleanField(default=False, help_text='A span of a loop kind (loop, loop.iteration, loop.move) was seen in this run.'),
        ),
        migrations.AddIndex(
            model_name='run',
            index=models.Index(condition=models.Q(('has_loop', True)), fields=['project', '-started_at', '-id'], name='traces_run_loop'),
        ),
        # Going back drops the column: nothing to undo.
        migrations.RunPython(backfill, migrations.RunPython.noop),
    ]
