"""Settings for controlplane, read from the environment.

With no environment set, everything runs embedded: SQLite under ``DATA_DIR`` (default ``./var``),
a Celery broker on a second SQLite file, an in-process channel layer. ``DATABASE_URL`` and
``REDIS_URL`` switch to PostgreSQL and Redis, as docker-compose.yml does.
"""
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from .env import database_from_url, env_bool, env_float, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(env_str("DATA_DIR", str(BASE_DIR / "var"))).resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)

DEBUG = env_bool("DEBUG", True)

SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY: must be set when DEBUG is off")
    SECRET_KEY = "dev-insecure-secret-key-only-for-DEBUG-never-production-0123456789"
# Keys are stored as HMAC-SHA256(API_KEY_PEPPER, key). Kept apart from SECRET_KEY so that rotating
# the session secret does not invalidate every agent's key.
API_KEY_PEPPER = env_str("API_KEY_PEPPER", SECRET_KEY)

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"] if DEBUG else [])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
TIME_ZONE = env_str("TIME_ZONE", "UTC")
try:
    import zoneinfo

    zoneinfo.ZoneInfo(TIME_ZONE)
except Exception:
    raise ImproperlyConfigured(f"TIME_ZONE: unknown time zone {TIME_ZONE!r}") from None
USE_TZ = True
LANGUAGE_CODE = "en-us"
USE_I18N = True

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "guardian",
    "channels",
    "django_celery_beat",  # beat's schedule as rows: the built-in sweeps below and the eval jobs' crons
    "controlplane",  # the composition root: its `serve` command wires web + worker + beat + gRPC
    "apps.common",
    "apps.audit",
    "apps.projects",
    "apps.traces",
    "apps.budgets",
    "apps.approvals",
    "apps.scheduler",
    "apps.gateway",
    "apps.evals",
    "apps.ingest",
    "apps.dashboard",  # the audit UI: pages and live consumers, no models
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "apps.common.middleware.RequestIdMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "apps.common.middleware.DatabaseUnavailableMiddleware",  # last, sync-only: see its docstring
]

ROOT_URLCONF = "controlplane.urls"
WSGI_APPLICATION = "controlplane.wsgi.application"
ASGI_APPLICATION = "controlplane.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database ------------------------------------------------------------------------------------
DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{DATA_DIR / 'controlplane.sqlite3'}")
_db = database_from_url("DATABASE_URL", DATABASE_URL)
if _db["ENGINE"].endswith("sqlite3"):
    # WAL lets readers run beside the one writer; IMMEDIATE takes the write lock at BEGIN so two
    # writers queue on busy_timeout instead of failing to upgrade a read lock mid-transaction.
    _db["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }
else:
    # Under ASGI persistent connections leak across threads; use psycopg's pool instead.
    _db["CONN_MAX_AGE"] = 0
    _db["OPTIONS"].setdefault("connect_timeout", "5")
    # The pool hands out only connections that pass a check, and a request waits at most
    # DATABASE_POOL_TIMEOUT seconds for one: with the database gone, the API answers 503 quickly.
    _db["CONN_HEALTH_CHECKS"] = True
    # Parameters travel beside the SQL instead of being quoted into it by the client (bulk span
    # inserts spent a third of the projection quoting arrays); see bench/RESULTS.md.
    _db["OPTIONS"]["server_side_binding"] = env_bool("DATABASE_SERVER_SIDE_BINDING", True)
    if env_bool("DATABASE_POOL", True):
        _db["OPTIONS"]["pool"] = {"min_size": 1, "max_size": env_int("DATABASE_POOL_MAX", 10, minimum=1),
                                  "timeout": env_int("DATABASE_POOL_TIMEOUT", 5, minimum=1)}
    _db["TEST"] = {"NAME": env_str("TEST_DATABASE_NAME", "") or None}
DATABASES = {"default": _db}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis, Celery, Channels, cache ----------------------------------------------------------------
REDIS_URL = env_str("REDIS_URL")
EMBEDDED = not REDIS_URL

if REDIS_URL:
    CELERY_BROKER_URL = REDIS_URL
    CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [REDIS_URL]}}
    }
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
else:
    # A broker that needs no server: Kombu's SQLAlchemy transport on its own SQLite file, so that
    # the broker's polling never contends with the application's write lock.
    CELERY_BROKER_URL = f"sqla+sqlite:///{DATA_DIR / 'celery-broker.sqlite3'}"
    # Embedded mode runs web, worker and beat in one process, so the in-memory layer reaches
    # every consumer (see controlplane/management/commands/serve.py).
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_TIME_LIMIT = 300
CELERY_TASK_SOFT_TIME_LIMIT = 240
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Redis redelivers an unacked message after visibility_timeout: keep it above the longest task.
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600} if REDIS_URL else {}
CELERY_BROKER_CONNECTION_TIMEOUT = 3
CELERY_BEAT_SCHEDULE: dict = {
    "traces-inbox-sweep": {"task": "traces.inbox_sweep", "schedule": env_int("TRACES_SWEEP_SECONDS", 15, minimum=1)},
    "traces-mark-lost": {"task": "traces.runs_mark_lost",
                         "schedule": env_int("TRACES_LOST_SWEEP_SECONDS", 60, minimum=1)},
    "traces-retention": {"task": "traces.runs_purge_expired",
                         "schedule": env_int("TRACES_RETENTION_SWEEP_SECONDS", 600, minimum=1)},
    "traces-stats-refresh": {"task": "traces.stats_refresh",
                             "schedule": env_int("TRACES_STATS_SWEEP_SECONDS", 60, minimum=1)},
}
# Beat keeps its schedule in the database (django-celery-beat): the entries above are written there when
# beat starts, eval jobs add their crons, and the admin edits them (superusers). No schedule file.
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TIMEZONE = TIME_ZONE  # an eval job's cron is read in the site's time zone

# --- Auth ------------------------------------------------------------------------------------------
AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "guardian.backends.ObjectPermissionBackend",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "/login/"  # the product's own login page (the admin keeps its own)
LOGIN_REDIRECT_URL = "/"
GUARDIAN_RAISE_403 = False
ANONYMOUS_USER_NAME = None  # no guardian anonymous user: anonymous callers see nothing

# --- Static ----------------------------------------------------------------------------------------
STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = DATA_DIR / "staticfiles"

# --- API -------------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "apps.projects.authentication.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "apps.common.errors.api_exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "controlplane API",
    "DESCRIPTION": (
        "The control plane for AI agents. Agents authenticate with an API key "
        "(`Authorization: Bearer cp_live_...` or `X-API-Key`). Every error shares one envelope: "
        '`{"error_code": "...", "message": "...", "details": {...}}`; see the ErrorCode enum.'
    ),
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "RoleEnum": "apps.projects.models.Role",
        "RunStatusEnum": "apps.traces.models.Run.Status",
        "SpanStatusEnum": "apps.traces.models.SpanStatus",
        "RunStartStatusEnum": "apps.traces.records.RUN_START_STATUSES",
        "RunFinishStatusEnum": "apps.traces.records.RUN_FINISH_STATUSES",
        "SpanKindEnum": "apps.traces.models.SpanKind",
        "RegressionKindEnum": "apps.evals.regressions.REGRESSION_KINDS",
        "QueueTaskKindEnum": "apps.scheduler.models.QueueTask.Kind",
        "QueueTaskStateEnum": "apps.scheduler.models.QueueTask.State",
    },
}

# --- Security (production guards) -----------------------------------------------------------------
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if env_bool("BEHIND_TLS_PROXY", False) else None
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", not DEBUG)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", not DEBUG)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 31536000, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = not DEBUG
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", not DEBUG)
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
if not DEBUG and not ALLOWED_HOSTS:
    raise ImproperlyConfigured("ALLOWED_HOSTS: must be set when DEBUG is off (comma-separated host names)")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    # httpx logs every request at INFO: a line per gateway call would cost the call boundary its CPU.
    "loggers": {"django.db.backends": {"level": "INFO"}, "httpx": {"level": "WARNING"},
                "httpcore": {"level": "WARNING"}},
}

# --- controlplane ----------------------------------------------------------------------------------
# Where the embedded server listens (make run); PORT is the conventional override.
PORT = env_int("PORT", 8000, minimum=1)
# Queues: ingest (raw batches → runs/spans), default, gpu. The embedded worker consumes them all.
CELERY_EMBEDDED_QUEUES = ["default", "ingest"]  # serve adds this machine's GPUs' queues

# --- The run log (apps.traces) ----------------------------------------------------------------------
# A worker that dies mid-projection holds its batches until the lease expires; then the sweeper
# hands them to another (a new worker sweeps as it starts). A live worker renews its leases every
# third of a lease, so this bounds the take-over time, not the length of a projection (seconds).
TRACES_LEASE_SECONDS = env_int("TRACES_LEASE_SECONDS", 15, minimum=1)
TRACES_MAX_ATTEMPTS = env_int("TRACES_MAX_ATTEMPTS", 5, minimum=1)
TRACES_PROJECTION_BATCH_LIMIT = env_int("TRACES_PROJECTION_BATCH_LIMIT", 20, minimum=1)
# One projection transaction takes at most this many records (spans, updates…), at least one batch;
# a projection task goes on claiming for up to TRACES_PROJECTION_TASK_SECONDS while batches wait.
TRACES_PROJECTION_ITEM_LIMIT = env_int("TRACES_PROJECTION_ITEM_LIMIT", 2000, minimum=1)
TRACES_PROJECTION_TASK_SECONDS = env_float("TRACES_PROJECTION_TASK_SECONDS", 10, minimum=0)
# The web process sends projection tasks at most this often (ids arriving between two go together).
TRACES_ENQUEUE_PACE_SECONDS = env_float("TRACES_ENQUEUE_PACE_SECONDS", 0.02, minimum=0)
TRACES_INBOX_RETENTION_HOURS = env_int("TRACES_INBOX_RETENTION_HOURS", 24, minimum=1)
# The beat sweep projects what waits (lost enqueues, expired leases, retries due) for at most this long.
TRACES_SWEEP_BUDGET_SECONDS = env_float("TRACES_SWEEP_BUDGET_SECONDS", 30, minimum=0)
TRACES_MAX_FIELD_BYTES = env_int("TRACES_MAX_FIELD_BYTES", 1024 * 1024, minimum=1024)
# Housekeeping (beat). A RUNNING run with no new span for this many minutes becomes LOST (a later span
# brings it back to RUNNING).
TRACES_LOST_AFTER_MINUTES = env_float("TRACES_LOST_AFTER_MINUTES", 5, minimum=0.01)
# Retention: runs (with their spans) older than a project's retention_days are deleted; a project
# without its own setting uses this default (0 = keep forever). Deleted in chunks of at most
# TRACES_RETENTION_CHUNK_ROWS rows per transaction, for at most TRACES_HOUSEKEEPING_BUDGET_SECONDS a pass.
TRACES_RETENTION_DAYS = env_int("TRACES_RETENTION_DAYS", 0, minimum=0)
TRACES_RETENTION_CHUNK_ROWS = env_int("TRACES_RETENTION_CHUNK_ROWS", 5000, minimum=1)
TRACES_HOUSEKEEPING_BUDGET_SECONDS = env_int("TRACES_HOUSEKEEPING_BUDGET_SECONDS", 60, minimum=1)
# Batches that could not be projected (DEAD) keep their payload for inspection this long, and so do
# the records the projection set aside (DeadRecord); both can be re-projected from the admin until then.
TRACES_DEAD_RETENTION_DAYS = env_int("TRACES_DEAD_RETENTION_DAYS", 7, minimum=1)
# Request bodies: 20 MiB at most (413 beyond); one field of a span 1 MiB at most (400 beyond).
MAX_REQUEST_BYTES = env_int("MAX_REQUEST_BYTES", 20 * 1024 * 1024, minimum=1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_REQUEST_BYTES

# --- OTLP ingest (apps.ingest) -----------------------------------------------------------------------
OTLP_MAX_BODY_BYTES = env_int("OTLP_MAX_BODY_BYTES", 20 * 1024 * 1024, minimum=1024)  # after decompression
# Spans accepted but not yet projected: above HIGH the receiver sheds load (503 + Retry-After) until
# the backlog is under LOW. 0 turns shedding off.
INGEST_BACKLOG_HIGH = env_int("INGEST_BACKLOG_HIGH", 1_000_000, minimum=0)
INGEST_BACKLOG_LOW = env_int("INGEST_BACKLOG_LOW", INGEST_BACKLOG_HIGH // 2, minimum=0)
INGEST_BACKLOG_RETRY_AFTER = env_int("INGEST_BACKLOG_RETRY_AFTER", 5, minimum=1)
# Requests per minute per API key (a key's own rate_limit_per_minute wins); 0 = unlimited.
INGEST_RATE_LIMIT_PER_MINUTE = env_int("INGEST_RATE_LIMIT_PER_MINUTE", 0, minimum=0)
# OTLP/gRPC: `manage.py otlp_grpc` listens here; `make run` (embedded) serves it in-process (0: not at all).
OTLP_GRPC_PORT = env_int("OTLP_GRPC_PORT", 4317, minimum=0)
OTLP_GRPC_WORKERS = env_int("OTLP_GRPC_WORKERS", 8, minimum=1)

# --- Accounts ------------------------------------------------------------------------------------------
# The first admin (`manage.py ensure_admin`, run by `make run`): a generated password is printed once
# when ADMIN_PASSWORD (or ADMIN_PASSWORD_FILE) is not set.
ADMIN_USERNAME = env_str("ADMIN_USERNAME", "admin")
ADMIN_PASSWORD = env_str("ADMIN_PASSWORD")
ADMIN_EMAIL = env_str("ADMIN_EMAIL", "")
# The password `manage.py db_app_role` gives the application's PostgreSQL role (empty: leave it as it is).
DATABASE_APP_PASSWORD = env_str("DATABASE_APP_PASSWORD")

# --- The audit log (apps.audit) ----------------------------------------------------------------------
# The hash chain cannot show that its newest rows were deleted, so beat anchors the tip (seq, hash,
# time) outside the database every AUDIT_ANCHOR_SECONDS: a log line, a line appended to
# AUDIT_ANCHOR_FILE and, when set, a JSON POST to AUDIT_ANCHOR_WEBHOOK_URL. `audit_verify` compares the
# table with the last anchor.
AUDIT_ANCHOR_SECONDS = env_int("AUDIT_ANCHOR_SECONDS", 300, minimum=1)
AUDIT_ANCHOR_FILE = Path(env_str("AUDIT_ANCHOR_FILE", str(DATA_DIR / "audit-anchors.jsonl"))).resolve()
AUDIT_ANCHOR_WEBHOOK_URL = env_str("AUDIT_ANCHOR_WEBHOOK_URL")
if AUDIT_ANCHOR_WEBHOOK_URL and not AUDIT_ANCHOR_WEBHOOK_URL.lower().startswith(("http://", "https://")):
    # urllib also opens file:// and ftp:// URLs; an anchor only ever goes to a web receiver.
    raise ImproperlyConfigured(
        f"AUDIT_ANCHOR_WEBHOOK_URL: expected an http(s):// URL, got {AUDIT_ANCHOR_WEBHOOK_URL!r}")
AUDIT_ANCHOR_WEBHOOK_TIMEOUT = env_float("AUDIT_ANCHOR_WEBHOOK_TIMEOUT", 5, minimum=0.1)
CELERY_BEAT_SCHEDULE["audit-anchor-tip"] = {"task": "audit.anchor_tip", "schedule": AUDIT_ANCHOR_SECONDS}

# --- Costs -----------------------------------------------------------------------------------------
# Spend spikes are judged every COSTS_SPIKE_SWEEP_SECONDS (the current and the previous hour of every
# project with spend); a spike's email goes through Django's mail settings (EMAIL_BACKEND; SMTP via
# EMAIL_HOST / EMAIL_PORT, default: written to the log).
COSTS_SPIKE_SWEEP_SECONDS = env_int("COSTS_SPIKE_SWEEP_SECONDS", 60, minimum=1)
CELERY_BEAT_SCHEDULE["budgets-spikes-detect"] = {"task": "budgets.spikes_detect",
                                                 "schedule": COSTS_SPIKE_SWEEP_SECONDS}
EMAIL_BACKEND = env_str("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
EMAIL_HOST = env_str("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 25, minimum=1)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "controlplane@localhost")

# --- Approvals -------------------------------------------------------------------------------------
# The beat expires approvals past their deadline and reminds about overdue ones every
# APPROVALS_SWEEP_SECONDS. A consume answers with a grant valid APPROVALS_GRANT_SECONDS. An agent's
# long-poll waits at most APPROVALS_MAX_WAIT_SECONDS (then asks again on the same approval).
APPROVALS_SWEEP_SECONDS = env_int("APPROVALS_SWEEP_SECONDS", 15, minimum=1)
APPROVALS_GRANT_SECONDS = env_int("APPROVALS_GRANT_SECONDS", 300, minimum=1)
APPROVALS_MAX_WAIT_SECONDS = 30
APPROVALS_DB_THREADS = env_int("APPROVALS_DB_THREADS", 4, minimum=1)  # the waiters' reads, off the views' thread
CELERY_BEAT_SCHEDULE["approvals-sweep"] = {"task": "approvals.sweep", "schedule": APPROVALS_SWEEP_SECONDS}
# Where people open the product (links in emails).
SITE_URL = env_str("SITE_URL", "http://127.0.0.1:8000")

# --- Budgets (caps) --------------------------------------------------------------------------------
# A reservation not settled within its time to live (the request's ttl_seconds, else this) is charged
# in full by the sweep that runs every BUDGETS_EXPIRE_SWEEP_SECONDS.
BUDGETS_RESERVATION_TTL_SECONDS = env_int("BUDGETS_RESERVATION_TTL_SECONDS", 600, minimum=1)
BUDGETS_EXPIRE_SWEEP_SECONDS = env_int("BUDGETS_EXPIRE_SWEEP_SECONDS", 30, minimum=1)
# A project's budgets and prices as reservations read them, kept this long per process (a change made
# elsewhere applies within it; one made in this process at once).
BUDGETS_CACHE_SECONDS = env_float("BUDGETS_CACHE_SECONDS", 2, minimum=0)
CELERY_BEAT_SCHEDULE["budgets-reservations-expire"] = {"task": "budgets.reservations_expire",
                                                       "schedule": BUDGETS_EXPIRE_SWEEP_SECONDS}

# --- Model gateway ---------------------------------------------------------------------------------
# /gateway/v1/... (OpenAI-compatible) forwards to each project's configured upstreams. Their routes are
# read from the database at most every GATEWAY_ROUTES_TTL_SECONDS per project (a change applies within
# that); an upstream that has not answered in its own timeout fails over to the next one.
GATEWAY_ROUTES_TTL_SECONDS = env_float("GATEWAY_ROUTES_TTL_SECONDS", 2, minimum=0)
# An API key presented at the gateway is checked against the database at most this often (a revoked
# key is refused within it); the gateway's database work runs on GATEWAY_DB_THREADS threads, each
# holding one connection.
GATEWAY_KEY_CACHE_SECONDS = env_float("GATEWAY_KEY_CACHE_SECONDS", 2, minimum=0)
GATEWAY_DB_THREADS = env_int("GATEWAY_DB_THREADS", 4, minimum=1)
# Connections to upstreams, in all, over GATEWAY_CLIENT_POOLS pools taken in turn (see gateway.app.client).
GATEWAY_MAX_CONNECTIONS = env_int("GATEWAY_MAX_CONNECTIONS", 256, minimum=1)
GATEWAY_CLIENT_POOLS = env_int("GATEWAY_CLIENT_POOLS", 16, minimum=1)
GATEWAY_MAX_BODY_BYTES = env_int("GATEWAY_MAX_BODY_BYTES", 8 * 1024 * 1024, minimum=1024)
# A model that a project's OpenAI-compatible GPU backend serves goes through the GPU queue (scheduler):
# the call waits for its task at most GATEWAY_QUEUE_WAIT_SECONDS, then withdraws it and answers 503.
GATEWAY_QUEUE_WAIT_SECONDS = env_float("GATEWAY_QUEUE_WAIT_SECONDS", 600, minimum=1)

# --- Evals -----------------------------------------------------------------------------------------
# After each run: a run's evaluations are due EVALS_AFTER_RUN_DELAY_SECONDS after its finish commits (late
# spans of an OTLP trace have that long to arrive). A worker's claim lasts EVALS_LEASE_SECONDS; the beat's
# sweep (every EVALS_SWEEP_SECONDS) enqueues again what waits longer than EVALS_ENQUEUE_GRACE_SECONDS or
# whose lease expired; after EVALS_MAX_ATTEMPTS claims a run's evaluation is given up (failed, visible).
EVALS_AFTER_RUN_DELAY_SECONDS = env_float("EVALS_AFTER_RUN_DELAY_SECONDS", 5, minimum=0)
EVALS_LEASE_SECONDS = env_float("EVALS_LEASE_SECONDS", 300, minimum=1)
EVALS_ENQUEUE_GRACE_SECONDS = env_float("EVALS_ENQUEUE_GRACE_SECONDS", 60, minimum=0)
EVALS_MAX_ATTEMPTS = env_int("EVALS_MAX_ATTEMPTS", 5, minimum=1)
EVALS_SWEEP_SECONDS = env_int("EVALS_SWEEP_SECONDS", 15, minimum=1)
# llm_judge calls models through our own gateway, over HTTP like any agent (traced, costed, capped). A
# judge's timeout (at most 120 s) stays well under EVALS_LEASE_SECONDS.
EVALS_GATEWAY_URL = env_str("EVALS_GATEWAY_URL", f"{SITE_URL.rstrip('/')}/gateway/v1")
CELERY_BEAT_SCHEDULE["evals-sweep"] = {"task": "evals.sweep", "schedule": EVALS_SWEEP_SECONDS}
# Batch jobs over history walk their runs in chunks of EVALS_JOB_CHUNK runs (EVALS_JOB_JUDGE_CHUNK where a
# job calls a judge), each chunk's scores, cursor and counts committed together under a lease of
# EVALS_JOB_LEASE_SECONDS (plus each judge's timeout per run of the chunk); the sweep above resumes a job
# whose worker died once its lease expired, and gives it up after EVALS_MAX_ATTEMPTS claims of one chunk.
EVALS_JOB_CHUNK = env_int("EVALS_JOB_CHUNK", 1000, minimum=1)
EVALS_JOB_JUDGE_CHUNK = env_int("EVALS_JOB_JUDGE_CHUNK", 10, minimum=1)
EVALS_JOB_LEASE_SECONDS = env_float("EVALS_JOB_LEASE_SECONDS", 120, minimum=1)
# A batch's runs are split into EVALS_JOB_LANES lanes (none shorter than a chunk) that workers walk side by
# side: one chunk of each lane at a time, so a batch uses as many worker processes as it has lanes.
EVALS_JOB_LANES = env_int("EVALS_JOB_LANES", 4, minimum=1)
# Regressions (evals.regressions): a drop of the pass rate or the mean score of at least EVALS_REGRESSION_MIN_DROP,
# with EVALS_REGRESSION_MIN_RUNS scored runs on each side, significant at EVALS_REGRESSION_ALPHA (one-sided).
EVALS_REGRESSION_MIN_RUNS = env_int("EVALS_REGRESSION_MIN_RUNS", 20, minimum=2)
EVALS_REGRESSION_MIN_DROP = env_float("EVALS_REGRESSION_MIN_DROP", 0.05, minimum=0)
EVALS_REGRESSION_ALPHA = env_float("EVALS_REGRESSION_ALPHA", 0.05, minimum=0)

# --- The GPU queue (apps.scheduler) ----------------------------------------------------------------
# GPUs are read through NVML (SCHEDULER_GPUS=auto: where it loads; nvml: required; declared: never) and,
# where there is none, are the GPUs declared here as name:MiB (SCHEDULER_DECLARED_GPUS=gpu0:24576,gpu1:81920).
SCHEDULER_GPUS = env_str("SCHEDULER_GPUS", "auto")
if SCHEDULER_GPUS not in ("auto", "nvml", "declared"):
    raise ImproperlyConfigured("SCHEDULER_GPUS: auto, nvml or declared.")
SCHEDULER_DECLARED_GPUS = []
for _gpu in env_list("SCHEDULER_DECLARED_GPUS", ["gpu0:24576"]):
    _name, _, _mb = _gpu.partition(":")
    if not _name or not _mb.isdigit() or int(_mb) < 1:
        raise ImproperlyConfigured(f"SCHEDULER_DECLARED_GPUS: name:MiB, not {_gpu!r}.")
    SCHEDULER_DECLARED_GPUS.append({"name": _name, "memory_mb": int(_mb)})
# The dispatcher ticks every SCHEDULER_TICK_SECONDS (beat; submissions, finishes and controls wake it at
# once): it samples the GPUs and admits what fits. A reading older than SCHEDULER_READING_MAX_AGE_SECONDS
# is no reading (the ledger alone decides). A waiting task gains a priority point every
# SCHEDULER_AGING_SECONDS; one that does not fit holds its device after SCHEDULER_STARVATION_SECONDS.
SCHEDULER_TICK_SECONDS = env_int("SCHEDULER_TICK_SECONDS", 1, minimum=1)
SCHEDULER_READING_MAX_AGE_SECONDS = env_float("SCHEDULER_READING_MAX_AGE_SECONDS", 10, minimum=1)
SCHEDULER_AGING_SECONDS = env_float("SCHEDULER_AGING_SECONDS", 60, minimum=1)
SCHEDULER_STARVATION_SECONDS = env_float("SCHEDULER_STARVATION_SECONDS", 30, minimum=0)
# Modules that register task handlers for handler backends (apps.scheduler.handlers.register).
SCHEDULER_HANDLER_MODULES = env_list("SCHEDULER_HANDLER_MODULES", [])
SCHEDULER_SCAN_LIMIT = env_int("SCHEDULER_SCAN_LIMIT", 500, minimum=1)  # waiting tasks a tick looks at, per device
# A running task's lease is SCHEDULER_LEASE_SECONDS, renewed every SCHEDULER_HEARTBEAT_SECONDS by its worker
# (which then also notices a cancel or a redirect); past it the worker is taken as lost and the task retried
# (up to its max_attempts) or failed. An admitted task unclaimed for SCHEDULER_CLAIM_GRACE_SECONDS is sent
# again (one claim wins). A task runs at most SCHEDULER_TASK_TIME_LIMIT seconds.
SCHEDULER_LEASE_SECONDS = env_float("SCHEDULER_LEASE_SECONDS", 30, minimum=1)
SCHEDULER_HEARTBEAT_SECONDS = env_float("SCHEDULER_HEARTBEAT_SECONDS", 2, minimum=0.05)
SCHEDULER_CLAIM_GRACE_SECONDS = env_float("SCHEDULER_CLAIM_GRACE_SECONDS", 30, minimum=1)
SCHEDULER_TASK_TIME_LIMIT = env_int("SCHEDULER_TASK_TIME_LIMIT", 3600, minimum=1)
# A worker whose attempt ended admits what it freed on its device at once (else the dispatcher's wake-up).
SCHEDULER_DISPATCH_ON_FINISH = env_bool("SCHEDULER_DISPATCH_ON_FINISH", True)
if SCHEDULER_HEARTBEAT_SECONDS * 3 > SCHEDULER_LEASE_SECONDS:
    raise ImproperlyConfigured("SCHEDULER_HEARTBEAT_SECONDS: at most a third of SCHEDULER_LEASE_SECONDS.")
# An agent's long-poll on a task waits at most SCHEDULER_MAX_WAIT_SECONDS (then asks again); the waits read
# on SCHEDULER_DB_THREADS threads of their own.
SCHEDULER_MAX_WAIT_SECONDS = 30
SCHEDULER_DB_THREADS = env_int("SCHEDULER_DB_THREADS", 4, minimum=1)
CELERY_BEAT_SCHEDULE["scheduler-tick"] = {"task": "scheduler.tick", "schedule": SCHEDULER_TICK_SECONDS}
