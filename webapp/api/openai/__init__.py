"""OpenAI's Images API: the request as the ``openai`` package sends it (``protocol``) and its routes (``routes``)."""
