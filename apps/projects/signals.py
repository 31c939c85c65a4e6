"""Signals for apps above projects to react to a project's settings without projects importing them.

* ``project_updated(sender=Project, project, changed: list[str])``: inside the transaction of
  ``services.project_update``, after the change is saved and audited; ``changed`` names the settings
  that changed (a time zone change re-derives the cost rollups' days, for example). A receiver that
  does slow work schedules it with ``transaction.on_commit``.
"""
from django.dispatch import Signal

project_updated = Signal()
