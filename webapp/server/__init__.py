"""gunicorn glue: the hooks the master and each worker run (``hooks``) and the worker class that reads whole
requests before a thread takes them (``gthread``). The top layer (docs/architecture.md §9)."""
