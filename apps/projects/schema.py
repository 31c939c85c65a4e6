"""Teach drf-spectacular how agents authenticate (loaded from ProjectsConfig.ready)."""
from drf_spectacular.extensions import OpenApiAuthenticationExtension


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "apps.projects.authentication.ApiKeyAuthentication"
    name = ["ApiKeyBearer", "ApiKeyHeader"]

    def get_security_definition(self, auto_schema):
        return [
            {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer cp_live_..."},
            {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        ]
