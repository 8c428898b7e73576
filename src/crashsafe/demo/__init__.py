"""The support-agent demo (``crashsafe demo``)."""
