import sys
from pathlib import Path

# The stand-in modules are imported by name in the driver and, through PYTHONPATH, in Ray's
# workers of the local multi-node clusters these tests start.
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
