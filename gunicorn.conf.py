"""gunicorn configuration: settings from the environment, and one-line hooks that call into webapp.

Run: gunicorn -c gunicorn.conf.py    (every setting is an environment variable; see README.md)
"""

import sys

from webapp import hooks, logs, worker
from webapp.settings import Settings, SettingsError

try:
    settings = Settings.from_env()
except SettingsError as exc:
    sys.exit(f"configuration error: {exc}")

wsgi_app = "webapp:create_app()"
bind = [settings.bind]
workers = settings.workers
# gthread (request threads keep answering probes while the engine thread generates), handing a thread only
# requests that have fully arrived, so slow or idle clients cannot take the threads probes need.
worker_class = worker.buffered_worker(settings.client_timeout, settings.max_body_bytes)
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
    hooks.on_starting(server, settings)


def pre_fork(server, worker):
    hooks.pre_fork(server, worker)


def post_fork(server, worker):
    hooks.post_fork(server, worker, settings)


def post_worker_init(worker):
    hooks.post_worker_init(worker)


def worker_int(worker):
    hooks.worker_int(worker)


def worker_exit(server, worker):
    hooks.worker_exit(server, worker)


def child_exit(server, worker):
    hooks.child_exit(server, worker)


def nworkers_changed(server, new_value, old_value):
    hooks.nworkers_changed(server, new_value, old_value)


def on_exit(server):
    hooks.on_exit(server)
