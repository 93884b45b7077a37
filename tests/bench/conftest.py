import sys
from pathlib import Path

# The bench scripts are not a package: their tests import them from bench/.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
