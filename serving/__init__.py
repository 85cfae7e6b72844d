"""Serving: the engine thread that steps an LLM's Scheduler (``engine``), the OpenAI-compatible HTTP
API over it (``server``, ``api``) and its Prometheus metrics (``metrics``). ``specjax serve`` runs it."""
