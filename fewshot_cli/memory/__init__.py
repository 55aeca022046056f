"""What memory a run may use and the guard that keeps it there: `limits` finds the limit, `guard` watches it."""
