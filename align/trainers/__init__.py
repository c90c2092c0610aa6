"""Driver-side training loops, one module per algorithm, plus the pieces they share."""
