"""gunicorn configuration: settings from the environment, and one-line hooks that call into webapp.

Run: gunicorn -c gunicorn.conf.py    (every setting is an environment variable; see README.md)
"""

import sys

from webapp.server import gthread, hooks
from webapp.settings import Settings, SettingsError, refusal
from webapp.telemetry import logs

try:
    settings = Settings.from_env()
except SettingsError as exc:
    sys.exit(refusal(exc))

server_hooks = hooks.server_hooks(settings)  # what the hooks share: the board, the workers' slots

# gunicorn asks for an app path, but the worker class below builds each worker's app with that worker's
# runtime (server_hooks.app) and never imports this one; a stock worker class (-k gthread) would, and
# create_app() without a runtime refuses to start (docs/architecture.md §1).
wsgi_app = "webapp:create_app()"
bind = [settings.bind]
# workers: gunicorn's own, from WEB_CONCURRENCY (or -w); the master reads the count it really runs.
# gthread (request threads keep answering probes while the engine thread generates), handing a thread only
# requests that have fully arrived, so slow or idle clients cannot take the threads probes need.
worker_class = gthread.buffered_worker(
    settings.client_timeout, server_hooks.body_limit, server_hooks.app, server_hooks.gate
)
threads = settings.threads
timeout = int(settings.worker_timeout)
graceful_timeout = int(settings.graceful_timeout)
max_requests = settings.max_requests
max_requests_jitter = settings.max_requests_jitter
preload_app = False  # the master never imports torch or touches CUDA
control_socket_disable = True  # a per-user default path: two instances on one host would fight over it
loglevel = settings.log_level
errorlog = "-"
accesslog = "-" if settings.access_log else None
logger_class = logs.server_logger(settings.log_format, settings.log_probes)


def on_starting(server):
    server_hooks.on_starting(server)


def when_ready(server):
    server_hooks.when_ready(server)


def pre_fork(server, worker):
    server_hooks.pre_fork(server, worker)


def post_fork(server, worker):
    server_hooks.post_fork(server, worker)


def post_worker_init(worker):
    server_hooks.post_worker_init(worker)


def worker_int(worker):
    server_hooks.worker_int(worker)


def worker_exit(server, worker):
    server_hooks.worker_exit(server, worker)


def child_exit(server, worker):
    server_hooks.child_exit(server, worker)


def nworkers_changed(server, new_value, old_value):
    server_hooks.nworkers_changed(server, new_value, old_value)


def on_exit(server):
    server_hooks.on_exit(server)
