"""``evaluate`` metric modules kept in the repository (loaded by path, never from the Hub)."""
