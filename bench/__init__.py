"""effmaml's benchmark harness: ``python -m bench`` sweeps inner steps per strategy."""
