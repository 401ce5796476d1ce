"""Make the top-level modules importable from tests/, and keep runs quiet and deterministic."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # subprocess tests run scripts from the project root
