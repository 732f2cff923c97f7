# Multi-stage: the virtualenv is made in the first stage, from wheels only (every pinned
# requirement ships one, so no compiler is needed); the final image copies it.
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY requirements.txt /tmp/requirements.txt
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --only-binary=:all: -r /tmp/requirements.txt

FROM python:3.11-slim-bookworm AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DJANGO_SETTINGS_MODULE=config.settings.base \
    VAR_DIR=/app/var
RUN groupadd --system app && useradd --system --gid app --home-dir /app --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=app:app . .
# collectstatic needs settings that import; these throwaway values never reach a running container.
RUN SECRET_KEY=build-only-$(python -c "print('x'*60)") WEBHOOK_SECRET=build-only \
    python manage.py collectstatic --noinput -v 0 && mkdir -p /app/var/media /app/var/sandbox /app/var/metrics && chown -R app:app /app/var /app/staticfiles
USER app
EXPOSE 8000
CMD ["gunicorn", "config.wsgi", "-c", "config/gunicorn.conf.py"]
