import os
import sys

# Let `pytest` run from a plain checkout too (the README installs the package, which makes this a no-op).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
