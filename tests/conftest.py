import os
import sys

# `from helpers import ...` and `from tests.helpers import ...` both work
sys.path.insert(0, os.path.dirname(__file__))
