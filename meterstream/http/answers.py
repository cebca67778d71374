"""The body of every error answer of the HTTP API, so clients read one shape."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi.responses import JSONResponse
from pydantic import BaseModel


class ErrorBody(BaseModel):
    """``{"error": "..."}``: what went wrong and what to do."""

    error: str


def error_answer(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """An error answer with ``{"error": message}``."""
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))
