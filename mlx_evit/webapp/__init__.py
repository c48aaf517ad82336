"""A local, private web app for Segment Anything (``python -m mlx_evit.sam serve``).

:mod:`mlx_evit.webapp.service` holds the model, the images and their
embeddings; :mod:`mlx_evit.webapp.server` is the HTTP side and documents the
JSON API; ``static/`` is the page (plain HTML, CSS and JavaScript, nothing
fetched from elsewhere).
"""

from mlx_evit.webapp.server import SamHTTPServer, is_loopback, make_server
from mlx_evit.webapp.service import ApiError, CachedPredictor, Limits, SamService

__all__ = ["SamService", "Limits", "ApiError", "CachedPredictor", "SamHTTPServer", "make_server", "is_loopback"]
