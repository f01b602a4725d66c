"""Serving: continuous-batching engine (engine.py), OpenAI-compatible HTTP API (app.py), CLI (cli.py).

Importing this package does not import FastAPI; only `smedjan.serve.app` needs it.
"""

from smedjan.serve.engine import Engine, EngineClosed, QueueFull, Request, TokenEvent

__all__ = ["Engine", "EngineClosed", "QueueFull", "Request", "TokenEvent"]
