"""Where the model comes from (placeholder, the seam is written next)."""
