"""What every stage's HTTP routes share: API-key checks and the error body.

Only ``meterstream serve`` (the face) and the stages' routers import this package; it needs the
``http`` extra (FastAPI).
"""

from meterstream.http.answers import ErrorBody, error_answer
from meterstream.http.auth import Authenticator

__all__ = ["Authenticator", "ErrorBody", "error_answer"]
