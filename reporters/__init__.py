"""Stage 3: push aggregated usage to Stripe meter events, with a ledger of what was sent."""
