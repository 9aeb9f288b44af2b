"""Result rendering: terminal tables (Rich) and JSON."""
