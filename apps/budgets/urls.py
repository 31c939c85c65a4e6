from django.urls import path

from . import api

urlpatterns = [
    path("costs", api.CostsView.as_view(), name="costs"),
    path("costs/unpriced", api.UnpricedView.as_view(), name="costs-unpriced"),
    path("costs/spikes", api.SpikeListView.as_view(), name="costs-spikes"),
    path("runs/<str:run_id>/costs", api.RunCostView.as_view(), name="run-costs"),
    path("projects/<slug:slug>/price-overrides", api.PriceOverrideListView.as_view(), name="price-overrides"),
    path("projects/<slug:slug>/price-overrides/<int:override_id>", api.PriceOverrideDetailView.as_view(),
         name="price-override-detail"),
    path("projects/<slug:slug>/cost-settings", api.CostSettingsView.as_view(), name="cost-settings"),
]
