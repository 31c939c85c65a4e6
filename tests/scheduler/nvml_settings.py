"""The least settings ``test_nvml.py`` needs on a bare GPU machine (no database, no other app)."""
SECRET_KEY = "nvml-check-only"
USE_TZ = True
SCHEDULER_GPUS = "auto"
