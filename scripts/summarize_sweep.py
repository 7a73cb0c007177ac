#!/usr/bin/env python3
"""Summarise a Hydra multirun sweep into summary.csv and accuracy.png.

Usage: python scripts/summarize_sweep.py multirun/2026-11-25/12-00-00
"""

import sys
from pathlib import Path

# Runnable from a checkout without installing fl_app.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_app.launch.sweep import main

if __name__ == "__main__":
    sys.exit(main())
