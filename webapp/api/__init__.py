"""The HTTP surface: routes, the request fields and their validation, the request path every generating route
shares (``jobs``), OpenAI's Images API (``openai``), the OpenAPI document, API keys and image encoding."""
