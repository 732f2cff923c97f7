#!/bin/sh
# Starts the server as the rabbitmq user in the foreground, logging to stdout: Debian's own wrapper
# (/usr/sbin/rabbitmq-server) would write the startup log to /var/log/rabbitmq instead. The CLI tools
# (rabbitmqctl, rabbitmq-diagnostics) keep Debian's wrappers, which switch to the rabbitmq user and its
# cookie in /var/lib/rabbitmq.
set -eu
if [ "$1" = rabbitmq-server ] && [ "$(id -u)" = 0 ]; then
  shift
  chown -R rabbitmq:rabbitmq /var/lib/rabbitmq
  cd /var/lib/rabbitmq
  exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups env HOME=/var/lib/rabbitmq \
    /usr/lib/rabbitmq/bin/rabbitmq-server "$@"
fi
exec "$@"
