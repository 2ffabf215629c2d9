"""Helpers every layer uses: atomic file writes, seeds, image reading and conversion."""
