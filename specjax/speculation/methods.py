"""Importing this module registers the built-in speculation methods (``proposer.register``), in
the order requests see them offered."""

from specjax.speculation import speculator, suffix, ngram  # noqa: F401  (tree; suffix, hybrid; ngram)
