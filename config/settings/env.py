"""Where the settings come from: the environment, and the file `make run` writes (read before any setting)."""

import os
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

__all__ = ["BASE_DIR", "DEBUG", "RUN_ENV_FILE", "VAR_DIR", "env"]

BASE_DIR = Path(__file__).resolve().parent.parent.parent
VAR_DIR = Path(environ.Env().str("VAR_DIR", default=str(BASE_DIR / "var")))

env = environ.Env()

# --- The settings `make run` chose ----------------------------------------------
# `make run` writes them (DEBUG, DATABASE_URL, REDIS_URL, EMAIL_URL, ...) to <VAR_DIR>/run.env, so a
# command in another terminal (`.venv/bin/python manage.py ...`, `.venv/bin/celery -A config ...`)
# reaches the same database and broker. A variable set in the environment wins over the file. Only a
# file of this user that no one else can write is read, since it can turn DEBUG on; images never
# hold one (.dockerignore leaves var/ out), and the test settings set RUN_ENV_FILE="" (none read).
RUN_ENV_FILE = env.str("RUN_ENV_FILE", default=str(VAR_DIR / "run.env"))
if RUN_ENV_FILE and Path(RUN_ENV_FILE).is_file():
    _run_env = Path(RUN_ENV_FILE).stat()
    if _run_env.st_uid != os.getuid() or _run_env.st_mode & 0o022:
        raise ImproperlyConfigured(f"{RUN_ENV_FILE} must belong to this user and be writable by no one else.")
    environ.Env.read_env(RUN_ENV_FILE)

# Debugging: what every other module relaxes on. Off unless asked for.
DEBUG = env.bool("DEBUG", default=False)
