"""codebook package."""
