"""`python -m training.sweep`: run the sweep's workers (training/sweep/worker.py)."""
import sys

from training.sweep.worker import main

sys.exit(main())
