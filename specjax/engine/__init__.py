"""The engine behind ``LLM`` and ``specjax serve``: requests (``request``), the step executor and
request validation (``core``), continuous batching (``scheduler``) and detokenising (``output``)."""
