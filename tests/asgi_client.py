"""Starlette's TestClient, imported once without its warning about the httpx2 fork.

It warns at import that it prefers httpx2; the project depends on httpx, which it still
supports. The warning is not about meshward, and warnings are errors in tests.
"""

from __future__ import annotations

import warnings

from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

__all__ = ["TestClient"]
