"""llm_cloud package."""
