import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub downloads in tests: DINOv2/VGG paths run on random weights
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GOLDEN = os.path.join(ROOT, "..", "shared", "golden")
ASSETS = os.path.join(ROOT, "..", "shared", "assets")
