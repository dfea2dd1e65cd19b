"""Sans-IO decisions: framing, pool, policies, reload plans."""
