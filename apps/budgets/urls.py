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
    path("projects/<slug:slug>/budgets", api.BudgetListView.as_view(), name="budgets"),
    path("projects/<slug:slug>/budgets/<int:budget_id>", api.BudgetDetailView.as_view(), name="budget-detail"),
    path("budget/reservations", api.ReservationCreateView.as_view(), name="reservations"),
    path("budget/reservations/<int:reservation_id>", api.ReservationDetailView.as_view(), name="reservation-detail"),
    path("budget/reservations/<int:reservation_id>/settle", api.ReservationSettleView.as_view(),
         name="reservation-settle"),
    path("budget/reservations/<int:reservation_id>/release", api.ReservationReleaseView.as_view(),
         name="reservation-release"),
]
