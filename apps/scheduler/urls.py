from django.urls import path

from . import api

urlpatterns = [
    path("queue/tasks", api.TaskListView.as_view(), name="queue-tasks"),
    path("queue/tasks/<str:task_id>", api.TaskDetailView.as_view(), name="queue-task"),
    path("queue/tasks/<str:task_id>/cancel", api.TaskCancelView.as_view(), name="queue-task-cancel"),
    path("queue/tasks/<str:task_id>/redirect", api.TaskRedirectView.as_view(), name="queue-task-redirect"),
    path("queue/tasks/<str:task_id>/priority", api.TaskPriorityView.as_view(), name="queue-task-priority"),
    path("projects/<slug:slug>/queue", api.QueueView.as_view(), name="queue"),
    path("projects/<slug:slug>/queue/controls", api.ControlView.as_view(), name="queue-controls"),
]
