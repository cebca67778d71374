"""The shared core of meterstream: event model, meter catalogue, settings, schema and metrics.

Data flows ``ingest`` -> Kafka -> ``aggregators`` -> database -> ``reporters`` -> Stripe; the stages
import this package and never each other.
"""

__version__ = "0.1.0"
