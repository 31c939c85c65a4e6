import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = ("Create the first admin account if no superuser exists. Credentials from ADMIN_USERNAME / "
            "ADMIN_PASSWORD (or ADMIN_PASSWORD_FILE), else a generated password printed once.")

    def handle(self, *args, **options):
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            return
        username = settings.ADMIN_USERNAME
        password = settings.ADMIN_PASSWORD
        generated = not password
        if generated:
            password = secrets.token_urlsafe(15)
        User.objects.create_superuser(username=username, email=settings.ADMIN_EMAIL, password=password)
        if generated:
            self.stdout.write(self.style.WARNING(
                f"\n  First admin account created.\n    username: {username}\n    password: {password}\n"
                "  (shown once; set ADMIN_PASSWORD to choose it yourself)\n"))
        else:
            self.stdout.write(f"First admin account created: {username}")
