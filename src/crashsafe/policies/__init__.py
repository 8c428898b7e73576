"""Resilience policies: failure classification, retries, breakers, fallbacks, escalation."""
