"""Run the nine tutorial sections in order, printing each one's output under its name.

python examples/run_tutorial.py
"""

import runpy
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here.parent))  # run from a checkout without installing too
for script in sorted(here.glob("tutorial_*.py")):
    print(f"== {script.stem}")
    runpy.run_path(str(script), run_name="__main__")
