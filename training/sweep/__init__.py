"""The experiment runner: the paper's Table 1 as one command (prompts x losses x seeds over many workers).

    python -m training.sweep ...          the workers (worker.py)
    python -m training.sweep.report DIR   the Table-1 report of a sweep folder (report.py)

plan.py expands the command into runs, claims.py shares them between workers without a coordinator,
markers.py records each run's end (done.json / failed.json).
"""
