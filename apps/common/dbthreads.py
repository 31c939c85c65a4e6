"""Database work of async code on threads of its own, off Daphne's one thread for sync views.

``sync_to_async`` (and Channels' ``database_sync_to_async``) run every call on one shared thread by
default: the thread every sync Django view runs on. An async path with many callers at once (the
gateway's calls, agents waiting on approvals) would queue behind the views and behind each other.
``DbThreads(setting, name)`` is a small pool (``settings.<setting>`` threads), each thread keeping its
database connection between calls (a connection past ``CONN_MAX_AGE`` or broken is replaced first)."""
from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection


class DbThreads:
    def __init__(self, setting: str, name: str) -> None:
        self.setting, self.name = setting, name
        self._executor: ThreadPoolExecutor | None = None

    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=getattr(settings, self.setting),
                                                thread_name_prefix=self.name)
        return self._executor

    def __call__(self, fn: Callable) -> Callable:
        """``fn`` as a coroutine function run on one of the pool's threads."""

        @functools.wraps(fn)
        def hygienic(*args, **kwargs):
            connection.close_if_unusable_or_obsolete()
            return fn(*args, **kwargs)

        return sync_to_async(hygienic, thread_sensitive=False, executor=self.executor())
