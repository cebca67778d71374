"""``python -m bench.report``: the reporter's delivery rate against a bare client, and Stripe
calls per million raw events (see __main__.py for what each part measures)."""
