"""Puts this folder on sys.path so that the test files here can `import _tiny`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
