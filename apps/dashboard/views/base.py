"""What every page shares: sign-in required, the caller's project access (the one authorization path,
``projects.access``), the navigation, and the project picker.

A person sees the projects they hold a role in (a superuser every project); ``is_staff`` plays no
part. Pages only read: an auditor can open every page of their projects and change nothing here.
"""
from __future__ import annotations

from django.contrib.auth.mixins import LoginRequiredMixin
from django.http import Http404
from django.urls import reverse
from django.utils.functional import cached_property
from django.views.generic import TemplateView

from apps.projects import selectors as project_selectors
from apps.projects.access import ProjectAccess, request_access
from apps.projects.models import SLUG_RE

from ..nav import NAV


class PageMixin(LoginRequiredMixin):
    """Sign-in required (to the product's login page, ``LOGIN_URL``) and scoped to the caller."""

    nav = ""
    raise_exception = False

    @property
    def access(self) -> ProjectAccess:
        return request_access(self.request)

    def project_param(self) -> str | None:
        """``?project=`` as a slug, or None; a malformed one matches nothing (404), never an error page."""
        slug = self.request.GET.get("project") or None
        if slug is not None and not SLUG_RE.fullmatch(slug):
            raise Http404
        return slug

    @cached_property
    def visible_projects(self) -> list[dict]:
        return project_selectors.projects_visible_to(self.access)

    def nav_context(self) -> dict:
        return {
            "nav": [{"label": e.label, "url": reverse(e.url_name), "active": e.key == self.nav} for e in NAV],
            "visible_projects": self.visible_projects,
            # Rows name their project only where the person sees more than one.
            "show_project": len(self.visible_projects) != 1,
        }


class Page(PageMixin, TemplateView):
    """A server-rendered page: ``get_context_data`` adds the page's own context to the layout's."""

    def get_context_data(self, **kwargs):
        return {**super().get_context_data(**kwargs), **self.nav_context()}
