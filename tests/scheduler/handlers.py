"""A task handler for the queue's tests (the GPU work itself cannot run here): ``record`` sleeps
``input.seconds`` (stopping when asked), then appends ``input.tag`` to the file ``input.path``, once per
completed run, so that a test counts how many times each task's work was done, across worker processes.
Loads and unloads are appended to ``input``-less ``SCHEDULER_TEST_LOG`` when it is set."""
from __future__ import annotations

import os
import time

from apps.scheduler import handlers


def _log(line: str) -> None:
    path = os.environ.get("SCHEDULER_TEST_LOG")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


class Record(handlers.Handler):
    def load(self, model):
        _log(f"load {model}")

    def unload(self, model):
        _log(f"unload {model}")

    def run(self, task_input, model, should_stop):
        end = time.monotonic() + float(task_input.get("seconds", 0))
        while time.monotonic() < end:
            if should_stop():
                raise handlers.Stopped
            time.sleep(0.01)
        if task_input.get("fail"):
            raise RuntimeError("asked to fail")
        with open(task_input["path"], "a") as f:
            f.write(f"{task_input['tag']}\n")
        return {"tag": task_input["tag"]}


handlers.register("record", Record())
