"""What the queue's tests share: an operator, declared GPUs as devices, handler backends (the ``record``
handler of ``tests.scheduler.handlers``: the GPU work itself cannot run here)."""
from __future__ import annotations

import pytest

from apps.projects import services as project_services
from apps.projects.models import Role
from apps.scheduler import services
from tests.scheduler import handlers as _handlers  # noqa: F401 - registers "record"


@pytest.fixture(autouse=True)
def _scheduler_settings(settings):
    settings.SCHEDULER_HANDLER_MODULES = ["tests.scheduler.handlers"]
    settings.SCHEDULER_GPUS = "declared"
    # The tests dispatch by hand (the workers of test_workers.py admit on finish, as deployed).
    settings.SCHEDULER_DISPATCH_ON_FINISH = False


@pytest.fixture
def olga(django_user_model, project, alice):
    """Operator of `project`: steers its queue."""
    user = django_user_model.objects.create_user("olga", password="pw-olga")
    project_services.role_grant(project=project, user=user, role=Role.OPERATOR, actor=alice)
    return user


@pytest.fixture
def make_device(project, alice):
    def make(name="gpu0", memory_mb=10_512, headroom_mb=512, **fields):
        return services.device_create(project=project, actor=alice, name=name, gpu=f"declared:{name}",
                                      memory_mb=memory_mb, headroom_mb=headroom_mb, **fields)

    return make


@pytest.fixture
def make_backend(project, alice):
    def make(device, name="b0", models=None, concurrency=10, **fields):
        return services.backend_create(project=project, actor=alice, name=name, device=device, kind="handler",
                                       handler="record", concurrency=concurrency,
                                       model_memory=models or {"m": {"load_mb": 2000, "request_mb": 1000}},
                                       **fields)

    return make


@pytest.fixture
def queue_key(project, alice):
    return project_services.api_key_create(project=project, name="agent", scopes=["queue", "ingest", "read"],
                                           actor=alice)
