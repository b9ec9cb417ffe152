"""The training engine: one iteration (trainer), one run end to end (run), run folders (run_dir)."""
