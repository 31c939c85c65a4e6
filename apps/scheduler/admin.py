"""The queue in the admin: devices and backends edited by project admins (through the audited services);
loaded models, tasks, their history and the operators' controls read-only for every role (operators steer
on the queue page or over the API, where the role is checked and each action audited with its reason)."""
from __future__ import annotations

from django import forms
from django.contrib import admin

from apps.projects.admin import EditedByProjectAdmins, ReadOnlyForRoles, VisibleProjectFilter

from . import services
from .models import Backend, Control, Device, DispatchEvent, GpuReading, LoadedModel, QueueTask


@admin.register(Device)
class DeviceAdmin(EditedByProjectAdmins):
    list_display = ("name", "project", "gpu", "memory_mb", "headroom_mb", "live_margin_mb", "enabled")
    list_filter = (VisibleProjectFilter, "enabled")
    search_fields = ("name", "gpu")
    list_select_related = ("project",)
    fields = ("project", "name", "gpu", "memory_mb", "headroom_mb", "live_margin_mb", "enabled")
    service_fields = Device.FIELDS

    def get_form(self, request, obj=None, **kwargs):
        form = super().get_form(request, obj, **kwargs)
        known = ", ".join(GpuReading.objects.values_list("gpu", flat=True)[:20])
        if "gpu" in form.base_fields and known:
            form.base_fields["gpu"].help_text += f" Seen here: {known}."
        return form

    def service_create(self, *, project, actor, values):
        return services.device_create(project=project, actor=actor, **values)

    def service_update(self, obj, *, actor, values):
        services.device_update(device=obj, actor=actor, **values)

    def service_delete(self, obj, *, actor):
        services.device_delete(device=obj, actor=actor)


class BackendForm(forms.ModelForm):
    class Meta:
        model = Backend
        fields = ["project", *Backend.FIELDS]

    def clean(self):
        data = super().clean()
        device, project = data.get("device"), data.get("project")
        if device is not None and project is not None and device.project_id != project.pk:
            self.add_error("device", "A device of the same project.")
        return data


@admin.register(Backend)
class BackendAdmin(EditedByProjectAdmins):
    form = BackendForm
    list_display = ("name", "project", "device", "kind", "url", "handler", "concurrency", "enabled")
    list_filter = (VisibleProjectFilter, "kind", "enabled")
    search_fields = ("name", "url", "handler")
    list_select_related = ("project", "device")
    fields = ("project", "name", "device", "kind", "url", "handler", "model_memory", "concurrency", "enabled")
    service_fields = Backend.FIELDS

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "device":  # the viewer's projects' devices only
            kwargs["queryset"] = Device.objects.visible_to(self.access(request))
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def service_create(self, *, project, actor, values):
        return services.backend_create(project=project, actor=actor, **values)

    def service_update(self, obj, *, actor, values):
        services.backend_update(backend=obj, actor=actor, **values)

    def service_delete(self, obj, *, actor):
        services.backend_delete(backend=obj, actor=actor)


@admin.register(LoadedModel)
class LoadedModelAdmin(ReadOnlyForRoles):
    list_display = ("model", "project", "device", "backend", "state", "memory_mb", "last_used_at")
    list_filter = (VisibleProjectFilter, "state")
    list_select_related = ("project", "device", "backend")


@admin.register(QueueTask)
class QueueTaskAdmin(ReadOnlyForRoles):
    list_display = ("created_at", "public_id", "project", "kind", "model", "backend", "state", "priority",
                    "memory_mb", "requested_by", "attempts")
    list_filter = (VisibleProjectFilter, "state", "kind")
    search_fields = ("public_id", "model", "run_id", "requested_by", "end_user")
    list_select_related = ("project", "backend")


@admin.register(DispatchEvent)
class DispatchEventAdmin(ReadOnlyForRoles):
    list_display = ("at", "project", "task", "event", "actor", "device", "backend", "waited_ms", "ran_ms")
    list_filter = (VisibleProjectFilter, "event")
    search_fields = ("task__public_id", "actor")
    list_select_related = ("project", "task")


@admin.register(Control)
class ControlAdmin(ReadOnlyForRoles):
    list_display = ("project", "device", "backend", "paused", "throttle_ms", "reason", "updated_by", "updated_at")
    list_filter = (VisibleProjectFilter, "paused")
    list_select_related = ("project", "device", "backend")
