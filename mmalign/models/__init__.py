"""Model builders and weight loading shared by every method (heavy libraries imported lazily)."""
