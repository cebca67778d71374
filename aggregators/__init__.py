"""Stage 2: faust workers that turn usage events into exact window totals in the database."""
