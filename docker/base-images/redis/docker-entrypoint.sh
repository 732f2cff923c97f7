#!/bin/sh
# The official image's Redis is built with protected mode off, so other containers can connect;
# Debian's is not, so turn it off here unless the command says otherwise.
set -eu
if [ "$1" = redis-server ]; then
  shift
  case " $* " in
    *" --protected-mode "*) set -- redis-server "$@" ;;
    " --"*|"  ") set -- redis-server --protected-mode no "$@" ;;
    *) config=$1; shift; set -- redis-server "$config" --protected-mode no "$@" ;;
  esac
  if [ "$(id -u)" = 0 ]; then
    chown -R redis:redis .
    exec setpriv --reuid=redis --regid=redis --init-groups "$@"
  fi
fi
exec "$@"
