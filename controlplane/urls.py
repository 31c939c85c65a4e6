from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from apps.common.views import healthz
from apps.ingest import views as otlp_views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("api/v1/", include("apps.projects.urls")),
    path("api/v1/", include("apps.traces.urls")),
    path("api/v1/", include("apps.budgets.urls")),
    path("api/v1/", include("apps.approvals.urls")),
    path("api/v1/", include("apps.scheduler.urls")),
    path("api/v1/", include("apps.evals.urls")),
    path("v1/traces", otlp_views.traces, name="otlp-traces"),
    path("v1/logs", otlp_views.logs, name="otlp-logs"),
    path("healthz", healthz, name="healthz"),
    path("", include("apps.dashboard.urls")),  # the product's pages, last: the API's paths come first
]

handler404 = "apps.common.views.not_found"
handler500 = "apps.common.views.server_error"
