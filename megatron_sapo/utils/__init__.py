"""Small shared utilities (process launching, logging)."""
