"""device_ranker package."""
