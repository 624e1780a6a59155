"""`clipkit serve`: the HTTP API (clip-retrieval compatible) and the web page. Needs the `serve` extra."""

from clipkit.serve.app import ServeConfig, create_app, load_indexes, parse_index_spec, serve

__all__ = ["ServeConfig", "create_app", "load_indexes", "parse_index_spec", "serve"]
