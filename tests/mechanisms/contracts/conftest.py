"""Puts this folder on sys.path so that the suites here can `import _layouts`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
