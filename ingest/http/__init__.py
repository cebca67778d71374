"""The ingest stage's HTTP side: ``POST /v1/events`` (needs the ``http`` extra)."""

from ingest.http.acks import RequestProducer
from ingest.http.routes import IngestRoutes, events_router, openapi_schemas

__all__ = ["IngestRoutes", "RequestProducer", "events_router", "openapi_schemas"]
