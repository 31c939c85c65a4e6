"""Signals for apps above traces (evals, costs, the dashboard) to react to the run log without
traces importing them. Sent after the projection's transaction commits; a failing receiver is
logged and never undoes or stalls ingest.

* ``run_changed(sender=Run, run, new_span_ids, updated_span_ids)``: a run or its spans changed.
* ``run_finished(sender=Run, run)``: a run reached a terminal status.
"""
from django.dispatch import Signal

run_changed = Signal()
run_finished = Signal()
