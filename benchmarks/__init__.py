"""Side-by-side measurements; run on demand, never part of the test suite."""
