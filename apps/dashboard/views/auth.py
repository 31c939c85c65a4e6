"""Signing in and out on the product's own pages (the admin keeps its own login for the back office)."""
from __future__ import annotations

from django.contrib.auth import views as auth_views


class LoginView(auth_views.LoginView):
    template_name = "dashboard/login.html"
    redirect_authenticated_user = True
    http_method_names = ["get", "post", "head", "options"]  # not PUT (a form view would accept it as POST)


class LogoutView(auth_views.LogoutView):
    """POST only (Django's LogoutView refuses GET): a link cannot sign someone out."""

    next_page = "dashboard:login"
